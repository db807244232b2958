# socketserver: build, test, install, demo and benchmark.
#
#   make          build the package into build/socketserver<version>/
#   make test     Rust tests and the tcltest suite (exits non-zero on failure)
#   make sim      the pool's simulation with 200000 sequences (SIMCASES=n)
#   make test-tcl9  the same under Tcl 9.0 (fetched into build/tcl9 if absent)
#   make demo     the echo server: a pool of forked workers on port 9901
#                 (DEMOFLAGS="PORT WORKERS" to change them, e.g. "9902 8")
#   make test-portable  the same suites with the FreeBSD/macOS path forced
#                 on Linux (cargo feature `portable`)
#   make check-ports  type-check for FreeBSD and macOS, Tcl 8.6 and 9 headers
#   make lint     cargo fmt --check and clippy (warnings denied), as CI runs them
#   make bench    benchmarks (bench/README.md); make bench-tcl9: Tcl 9.0 vs 8.6
#   make install  install where tclsh finds packages (DESTDIR, PREFIX)
#
# Missing Debian packages are installed with apt-get (scripts/need-packages).

VERSION   := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
TCLSH     ?= tclsh8.6
CARGO     ?= cargo
PKGNAME   := socketserver$(VERSION)
PKGDIR    := build/$(PKGNAME)
# cargo names a cdylib .dylib on macOS.
SOEXT     := $(if $(filter Darwin,$(shell uname -s)),dylib,so)
LIBFILE   := libsocketserver.$(SOEXT)
TCL9LIBFILE := libtcl9socketserver$(VERSION).$(SOEXT)
TCL9DIR   := build/tcl9
PREFIX    ?= /usr/local
DESTDIR   ?=
TCLPKGDIR ?= $(PREFIX)/lib/tcltk
NEED      := scripts/need-packages

BUILD_PACKAGES := tcl8.6 tcl8.6-dev tcl-dev libclang-dev pkg-config
TEST_PACKAGES  := tclx8.4 tcl-thread tcllib binutils apache2-utils systemd tcl-tls openssl curl haproxy prometheus python3 tini dumb-init
BENCH_PACKAGES := apache2-utils gcc
PORTS_PACKAGES := rustc-web rust-web-src
PORTABLEDIR := build/portable
BASELINE    ?= main
BASELINEDIR := build/baseline

.PHONY: all build install-package build-baseline deps lint test test-rust sim test-tcl test-tcl9 test-portable build-portable check-ports demo bench bench-tcl9 soak memcheck install uninstall clean tcl9 build-tcl9

all: build

deps:
	@$(NEED) $(BUILD_PACKAGES)

build: deps
	$(CARGO) build --release
	@$(MAKE) --no-print-directory install-package

# The package directory PKGDIR from what cargo built (LIBSOURCE, and
# TCL9LIBSOURCE when given). Servers run from build/ while it is rebuilt:
# every file is written beside its place and renamed over it
# (scripts/install-atomic), never rewritten where running processes map
# or read it (tests/install.test checks it with a running pool).
LIBSOURCE     ?= target/release/$(LIBFILE)
TCL9LIBSOURCE ?=
install-package:
	mkdir -p $(PKGDIR)
	scripts/install-atomic $(LIBSOURCE) $(PKGDIR)/$(LIBFILE)
	if [ -n "$(TCL9LIBSOURCE)" ]; then scripts/install-atomic $(TCL9LIBSOURCE) $(PKGDIR)/$(TCL9LIBFILE); fi
	scripts/install-atomic tcl/socketserver.tcl $(PKGDIR)/socketserver.tcl
	sed -e 's/@VERSION@/$(VERSION)/g' -e 's/@LIBFILE@/$(LIBFILE)/g' -e 's/@TCL9LIBFILE@/$(TCL9LIBFILE)/g' \
	    pkgIndex.tcl.in > $(PKGDIR)/.pkgIndex.tcl.new.$$$$ && \
	    mv -f $(PKGDIR)/.pkgIndex.tcl.new.$$$$ $(PKGDIR)/pkgIndex.tcl

# Tcl 9.0 from Debian 13 into build/tcl9 (the system is left as it was), and
# the library built against its headers beside the 8.6 one (README, "Tcl
# versions").
tcl9:
	scripts/get-tcl9 $(TCL9DIR)

build-tcl9: build tcl9
	PKG_CONFIG_PATH=$(CURDIR)/$(TCL9DIR)/pkgconfig CARGO_TARGET_DIR=target/tcl9 $(CARGO) build --release
	@$(MAKE) --no-print-directory install-package TCL9LIBSOURCE=target/tcl9/release/$(LIBFILE)

# Layout and lint, as CI checks them: the house width is in rustfmt.toml.
lint: deps
	scripts/check-pool-layers
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --release -- -D warnings
	$(CARGO) clippy --all-targets --release --features portable -- -D warnings

test: build
	@$(NEED) $(TEST_PACKAGES)
	$(MAKE) --no-print-directory test-rust test-tcl

test-rust:
	$(CARGO) test --release -- --test-threads=1

# The pool's simulation alone, with many more sequences than `make test`
# runs (src/pool/model/simulation/; SIMCASES=n to change how many). A
# failure prints its shrunk sequence and is saved under proptest-regressions/.
SIMCASES ?= 200000
sim:
	PROPTEST_CASES=$(SIMCASES) $(CARGO) test --release --lib pool::model::simulation

test-tcl:
	TCLLIBPATH=$(CURDIR)/build $(TCLSH) tests/all.tcl $(TESTFLAGS)

# The same suites under Tcl 9.0 (its library built beside the 8.6 one):
# the Rust tests built against the Tcl 9 headers, then tcltest in tclsh9.0.
test-tcl9: build-tcl9
	@$(NEED) $(TEST_PACKAGES)
	PKG_CONFIG_PATH=$(CURDIR)/$(TCL9DIR)/pkgconfig CARGO_TARGET_DIR=target/tcl9 $(CARGO) test --release
	TCLLIBPATH=$(CURDIR)/build $(TCL9DIR)/tclsh9.0 tests/all.tcl $(TESTFLAGS)

# The portable path (FreeBSD, macOS) forced on Linux: the library built with
# the `portable` feature into build/portable/, and the whole suite against
# it (README, "Platforms").
build-portable: deps
	CARGO_TARGET_DIR=target/portable $(CARGO) build --release --features portable
	@$(MAKE) --no-print-directory install-package PKGDIR=$(PORTABLEDIR)/$(PKGNAME) LIBSOURCE=target/portable/release/$(LIBFILE)

test-portable: build-portable
	@$(NEED) $(TEST_PACKAGES)
	CARGO_TARGET_DIR=target/portable $(CARGO) test --release --features portable -- --test-threads=1
	SOCKETSERVER_PORTABLE=1 TCLLIBPATH=$(CURDIR)/$(PORTABLEDIR) $(TCLSH) tests/all.tcl $(TESTFLAGS)

# Type-checks for x86_64-unknown-freebsd, x86_64-apple-darwin and
# aarch64-apple-darwin against the Tcl 8.6 and Tcl 9 headers (no link, no
# run: scripts/check-ports says what it proves).
check-ports: deps tcl9
	@$(NEED) $(PORTS_PACKAGES)
	scripts/check-ports "" $(CURDIR)/$(TCL9DIR)/pkgconfig

demo: build
	TCLLIBPATH=$(CURDIR)/build $(TCLSH) examples/echo_server.tcl $(DEMOFLAGS)

bench: build build-portable
	@$(NEED) $(TEST_PACKAGES) $(BENCH_PACKAGES)
	$(CARGO) bench --bench handoff -- $(HANDOFFFLAGS)
	TCLLIBPATH=$(CURDIR)/build $(TCLSH) bench/run.tcl $(BENCHFLAGS)
	TCLLIBPATH=$(CURDIR)/build $(TCLSH) bench/pool.tcl $(POOLBENCHFLAGS)
	TCLLIBPATH=$(CURDIR)/build $(TCLSH) bench/httpd.tcl $(HTTPDBENCHFLAGS)
	TCLLIBPATH=$(CURDIR)/build $(TCLSH) bench/security.tcl $(SECURITYBENCHFLAGS)
	TCLLIBPATH=$(CURDIR)/build $(TCLSH) bench/portable.tcl $(PORTABLEBENCHFLAGS)
	TCLLIBPATH=$(CURDIR)/build $(TCLSH) bench/recycle.tcl $(RECYCLEBENCHFLAGS)
	$(MAKE) --no-print-directory build-baseline
	TCLLIBPATH=$(CURDIR)/build $(TCLSH) bench/queue.tcl -baseline $(CURDIR)/$(BASELINEDIR)/src/build $(QUEUEBENCHFLAGS)
	TCLLIBPATH=$(CURDIR)/build $(TCLSH) bench/metrics.tcl $(METRICSBENCHFLAGS)
	TCLLIBPATH=$(CURDIR)/build $(TCLSH) bench/sizing.tcl $(SIZINGBENCHFLAGS)

# The tree bench/queue.tcl compares with (BASELINE: a git revision, main by
# default), built as it builds itself, into build/baseline.
# The source is extracted again only when the revision changed.
build-baseline:
	@rev=$$(git rev-parse $(BASELINE)) && \
	if [ "$$(cat $(BASELINEDIR)/rev 2>/dev/null)" != "$$rev" ]; then \
	    rm -rf $(BASELINEDIR)/src && mkdir -p $(BASELINEDIR)/src && \
	    git archive $$rev | tar -x -C $(BASELINEDIR)/src && echo $$rev > $(BASELINEDIR)/rev; \
	fi
	$(MAKE) --no-print-directory -C $(BASELINEDIR)/src build

# Tcl 9.0 against Tcl 8.6 in one run (bench/tcl9.tcl).
bench-tcl9: build-tcl9
	@$(NEED) $(TEST_PACKAGES) $(BENCH_PACKAGES)
	TCLLIBPATH=$(CURDIR)/build $(TCLSH) bench/tcl9.tcl $(TCL9DIR)/tclsh9.0 $(TCL9BENCHFLAGS)

install: build
	mkdir -p $(DESTDIR)$(TCLPKGDIR)/$(PKGNAME)
	install -m 0755 -s $(PKGDIR)/$(LIBFILE) $(DESTDIR)$(TCLPKGDIR)/$(PKGNAME)/
	if [ -f $(PKGDIR)/$(TCL9LIBFILE) ]; then install -m 0755 -s $(PKGDIR)/$(TCL9LIBFILE) $(DESTDIR)$(TCLPKGDIR)/$(PKGNAME)/; fi
	install -m 0644 $(PKGDIR)/pkgIndex.tcl $(PKGDIR)/socketserver.tcl $(DESTDIR)$(TCLPKGDIR)/$(PKGNAME)/
	mkdir -p $(DESTDIR)$(PREFIX)/share/man/mann
	install -m 0644 doc/socketserver.n $(DESTDIR)$(PREFIX)/share/man/mann/socketserver.n

uninstall:
	rm -rf $(DESTDIR)$(TCLPKGDIR)/$(PKGNAME) $(DESTDIR)$(PREFIX)/share/man/mann/socketserver.n

clean:
	rm -rf build
	$(CARGO) clean

soak: build
	@$(NEED) $(TEST_PACKAGES) $(BENCH_PACKAGES)
	TCLLIBPATH=$(CURDIR)/build $(TCLSH) bench/soak.tcl -server socketserver $(SOAKFLAGS)
	TCLLIBPATH=$(CURDIR)/build $(TCLSH) bench/soak.tcl -server pool $(SOAKFLAGS)
	TCLLIBPATH=$(CURDIR)/build $(TCLSH) bench/soak.tcl -server pool -maxconnections 2000 $(SOAKFLAGS)

# The tcltest suite under valgrind; every tclsh it starts is checked too.
# Every test file by default; tests that cannot run under valgrind say why
# with the constraint notMemcheck. The programs the tests drive (clients,
# proxies, kill, and promtool and prometheus: Go programs, whose own
# runtime valgrind reports as invalid accesses) are not checked.
# scripts/memcheck-summary.tcl then fails on any report involving our
# library but the kinds of definite loss scripts/memcheck.kinds explains,
# and states the invalid accesses counted.
MEMCHECK_FILES ?= $(notdir $(wildcard tests/*.test))
memcheck: build
	@$(NEED) $(TEST_PACKAGES) valgrind
	rm -rf build/memcheck && mkdir -p build/memcheck
	status=0; \
	SOCKETSERVER_MEMCHECK=1 SOCKETSERVER_WATCHDOG_MS=60000 TCLLIBPATH=$(CURDIR)/build \
	    valgrind --tool=memcheck --trace-children=yes \
	    --trace-children-skip='*/ls,*/readelf,*/nm,*/sh,*/ab,*/kill,*/curl,*/haproxy,*/openssl,*/promtool,*/prometheus' \
	    --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
	    --num-callers=40 --log-file=$(CURDIR)/build/memcheck/%p.log \
	    $(TCLSH) tests/all.tcl -file "$(MEMCHECK_FILES)" || status=1; \
	$(TCLSH) scripts/memcheck-summary.tcl build/memcheck || status=1; \
	exit $$status
