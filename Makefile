# blsfab: the two commands of the README, plus the benchmarks.
PYTHON ?= python3
NP ?= 4
# Open MPI refuses root without these; --oversubscribe lets 4 ranks share 2 cores.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
MPIRUN := mpirun --oversubscribe --mca btl vader,self -np $(NP)

.PHONY: setup test demo engine-demo bench clean

setup:
	bash scripts/setup.sh

test: setup
	$(PYTHON) -m pytest -q tests

demo: setup
	$(MPIRUN) $(PYTHON) -m dlrm_adapter --demo

engine-demo: setup
	$(MPIRUN) $(PYTHON) -m blsfab.demo

clean:
	rm -rf build src/*.egg-info src/blsfab/_core.c src/blsfab/_core*.so
