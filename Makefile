# shakedown: the two commands of the README, and the checks behind them.
CARGO ?= cargo

.PHONY: run test lint bench build clean

## make run: build shakedown and run the quick-start playbook on the local cluster.
run:
	$(CARGO) build --release
	./target/release/shakedown run playbooks/quickstart.yaml

## make test: formatting, lints, then every test (unit, integration, end to end).
test: lint
	.ci/install-test-tools
	$(CARGO) test --doc
	# Not --all-targets: that would run the benchmark too (`make bench`);
	# clippy above still builds it.
	$(CARGO) test --lib --bins --tests

## make bench: the load generator's speed and memory, and summarising 1,000,000 records.
bench:
	$(CARGO) bench --bench load

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

build:
	$(CARGO) build --release

clean:
	$(CARGO) clean
