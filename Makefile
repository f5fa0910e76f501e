# vtl: make run (serve on 127.0.0.1:3260) | make test (whole suite) | make bench | make clean
# | make distclean (also removes the venv)
# Idempotent: the venv is (re)installed only when pyproject.toml changes; apt runs only when a
# package is missing.

PYTHON      ?= python3
VENV        := .venv
STAMP       := $(VENV)/.installed
SYS_PACKAGES := libiscsi-bin libiscsi-dev tgt libnfs-utils
# make bench only: the NFS-Ganesha peer of the NFS figures (bench/nfs.py)
BENCH_PACKAGES := nfs-ganesha nfs-ganesha-vfs rpcbind iproute2 util-linux
VTL_ARGS    ?=
PYTEST_ARGS ?=
# Two workers, each taking whole files (module fixtures stay in one process); most tests wait on
# servers and subprocesses, so this halves the wall time on 2 cores. PYTEST_JOBS= runs serially.
PYTEST_JOBS ?= -n 2 --dist loadfile

.PHONY: run test bench clean distclean sysdeps benchdeps venv

run: $(STAMP)
	exec $(VENV)/bin/vtl serve $(VTL_ARGS)

venv: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

sysdeps:
	@missing=""; \
	for p in $(SYS_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" \
	    || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

# pytest exits 5 when it collected no tests: that is a failure too, and said so.
test: sysdeps $(STAMP)
	@rc=0; $(VENV)/bin/python -m pytest -q $(PYTEST_JOBS) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests ran (pytest exit 5)" >&2; fi; \
	exit $$rc

benchdeps:
	@$(MAKE) --no-print-directory sysdeps SYS_PACKAGES="$(SYS_PACKAGES) $(BENCH_PACKAGES)"

bench: benchdeps $(STAMP)
	@if [ -f bench/run.py ]; then exec $(VENV)/bin/python bench/run.py; \
	elif [ -f bench/__main__.py ]; then exec $(VENV)/bin/python -m bench; \
	else echo "make bench: no benchmark yet (bench/run.py)" >&2; exit 1; fi

# clean keeps the venv (re-creating it needs the network); distclean removes it too.
clean:
	rm -rf build dist .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -not -path './.git/*' -not -path './$(VENV)/*' \
	  -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
