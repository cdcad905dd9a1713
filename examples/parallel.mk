# Trivial scheduling, 1: many independent tasks, each started through omuscd run, which
# puts it where the cluster has room; make -j decides how many run at once.
#
#   make -f parallel.mk -j8            (16 tasks; results in out/)
#   make -f parallel.mk -j8 TASKS=64 ITERATIONS=300000000
#
# Each task is the C timewaster with its own amount of work; its checksum is its result.
OMUSCD ?= omuscd
TASKS ?= 16
ITERATIONS ?= 20000000
RESULTS := $(addprefix out/task,$(addsuffix .txt,$(shell seq 1 $(TASKS))))

all: $(RESULTS)
	@cat $(RESULTS) | wc -l | xargs echo "tasks done:"

out/task%.txt: timewaster | out
	$(OMUSCD) run -- ./timewaster -n $$(( $(ITERATIONS) + $* )) > $@.tmp && mv $@.tmp $@

timewaster: timewaster.c
	$(MAKE) -f Makefile timewaster

out:
	mkdir -p out

clean:
	rm -rf out

.PHONY: all clean
