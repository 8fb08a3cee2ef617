# The two commands a newcomer needs: `make run` and `make test`.
CARGO ?= cargo

.PHONY: run test deps build lint bench clean-data

## Build, start the center on the demo configuration and send it the samples.
run: deps
	$(CARGO) build --release --bins
	scripts/run-demo.sh

## Install missing tools, then run every test.
test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) test --workspace --no-fail-fast

deps:
	scripts/install-deps.sh

build:
	$(CARGO) build --workspace

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Benchmarks (not tests): ingest vs DCMTK storescp and Orthanc; upload tool vs storescu; query/retrieve vs Orthanc; rendering vs dcmj2pnm and Orthanc.
bench:
	scripts/install-deps.sh --bench
	$(CARGO) build --release --bins
	python3 benches/ingest.py
	python3 benches/upload.py
	python3 benches/query.py
	python3 benches/render.py

clean-data:
	rm -rf data/demo
