# The two commands of README.md.
.PHONY: run test bench lint

run:  ## set up and run the service (MODE=postgres for PostgreSQL only)
	./scripts/run $(if $(filter postgres,$(MODE)),--postgres,)

test:  ## set up and run the whole test suite
	./scripts/test

bench:  ## run the benchmark scenarios (see bench/README.md)
	./scripts/bootstrap.sh dev && .venv/bin/python -m bench

lint:
	./scripts/bootstrap.sh dev && .venv/bin/ruff check . && .venv/bin/ruff format --check .
