.PHONY: demo test lint bench bench-more bench-acme bench-smoke bench-soak bench-slow clean

demo:            ## run tlsedge on generated demo certificates and a demo backend
	bash scripts/demo.sh

test:            ## install everything the tests need, then run the whole suite
	bash scripts/test.sh

lint:
	.venv/bin/ruff check proxy tests benchmarks && .venv/bin/mypy && .venv/bin/lint-imports

bench:           ## cost per connection beside nginx, HAProxy, Caddy and the two floors, 1 and 2 workers (~42 min), then ACME at scale
	bash scripts/setup.sh test && .venv/bin/python benchmarks/compare.py && \
		.venv/bin/python benchmarks/acme_scale.py

bench-more:      ## large bodies, HTTP/2, many names, hot swap beside the same peers (2 workers, ~15 min)
	bash scripts/setup.sh test && .venv/bin/python benchmarks/compare.py --workers 2 \
		--scenarios large,h2,names,swap

bench-acme:      ## N domains in one bulk add until all In use: 20 and 200 names, 1 and 3 nodes
	bash scripts/setup.sh test && .venv/bin/python benchmarks/acme_scale.py

bench-smoke:     ## the same harness in a quick run: 1 round, 2 s, small sets
	bash scripts/setup.sh test && .venv/bin/python benchmarks/compare.py --quick

bench-cluster:   ## start-up, RSS and propagation with 100,000 domains in etcd (minutes)
	bash scripts/setup.sh test && .venv/bin/python benchmarks/cluster_scale.py

bench-soak:      ## one node under mixed load, SIGHUP and uploads: RSS/FD/lag slopes (MINUTES=3)
	bash scripts/setup.sh test && .venv/bin/python benchmarks/soak.py --minutes $(or $(MINUTES),3)

bench-slow:      ## slowhttptest -H/-B/-X against tlsedge and nginx, a probe every 2 s (minutes)
	bash scripts/setup.sh test && .venv/bin/python benchmarks/slow_clients.py

clean:
	rm -rf .venv tlsedge-demo build *.egg-info
