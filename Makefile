.PHONY: demo test lint bench bench-smoke clean

demo:            ## run tlsedge on generated demo certificates and a demo backend
	bash scripts/demo.sh

test:            ## install everything the tests need, then run the whole suite
	bash scripts/test.sh

lint:
	.venv/bin/ruff check proxy tests benchmarks && .venv/bin/mypy && .venv/bin/lint-imports

bench:           ## benchmarks side by side with nginx, HAProxy and Caddy (minutes)
	bash scripts/setup.sh test && .venv/bin/python benchmarks/table_scale.py --count 100000

clean:
	rm -rf .venv tlsedge-demo build *.egg-info
