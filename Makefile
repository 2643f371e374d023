.PHONY: demo test lint bench bench-smoke clean

demo:            ## run tlsedge on generated demo certificates and a demo backend
	bash scripts/demo.sh

test:            ## install everything the tests need, then run the whole suite
	bash scripts/test.sh

lint:
	.venv/bin/ruff check proxy tests benchmarks && .venv/bin/mypy && .venv/bin/lint-imports

bench:           ## benchmarks side by side with nginx, HAProxy and Caddy (minutes)
	bash scripts/setup.sh test && .venv/bin/python benchmarks/compare.py

bench-smoke:     ## the same harness in a quick run: 1 round, 2 s, small certificate sets
	bash scripts/setup.sh test && .venv/bin/python benchmarks/compare.py --quick

bench-cluster:   ## start-up, RSS and propagation with 100,000 domains in etcd (minutes)
	bash scripts/setup.sh test && .venv/bin/python benchmarks/cluster_scale.py

clean:
	rm -rf .venv tlsedge-demo build *.egg-info
