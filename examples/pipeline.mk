# Trivial scheduling, 2: stages whose outputs feed the next, each stage run through
# omuscd run (anywhere in the cluster: omuscd assumes the same paths on every node).
#
#   make -f pipeline.mk          (numbers -> squares -> their sum, in stage/)
OMUSCD ?= omuscd
N ?= 100000

all: stage/sum.txt
	@echo "sum of squares of 1..$(N): $$(cat stage/sum.txt)"

stage/numbers.txt: | stage
	$(OMUSCD) run -- seq 1 $(N) > $@.tmp && mv $@.tmp $@

stage/squares.txt: stage/numbers.txt
	$(OMUSCD) run -- awk '{ print $$1 * $$1 }' $(CURDIR)/$< > $@.tmp && mv $@.tmp $@

stage/sum.txt: stage/squares.txt
	$(OMUSCD) run -- awk '{ s += $$1 } END { printf "%d\n", s }' $(CURDIR)/$< > $@.tmp && \
	    mv $@.tmp $@

stage:
	mkdir -p stage

clean:
	rm -rf stage

.PHONY: all clean
