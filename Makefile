# dsrt build. `make` builds the program, the libraries and the Lua module; `make test` and
# `make demo` first install what is missing (tools/setup.sh), so they work on a fresh Debian 12.
#   CUDA=0       build without kernels even where nvcc exists (default: use nvcc when found)
#   BUILD=dir    output folder (default build)
SHELL := /bin/bash
BUILD ?= build
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
ifeq ($(origin CUDA), undefined)
CUDA := $(if $(NVCC),1,0)
endif
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
MULTIARCH := $(shell gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
LUA_INC ?= /usr/include/lua5.4
LUA_A ?= /usr/lib/$(MULTIARCH)/liblua5.4.a
CJSON_A ?= /usr/lib/$(MULTIARCH)/liblua5.4-cjson.a

CC := gcc
OPT ?= -O2
SAN ?=
CFLAGS := -std=c17 $(OPT) -g -Wall -Wextra -Werror -fPIC -fopenmp -D_GNU_SOURCE \
          -DDSRT_HAVE_CUDA=$(CUDA) -Iruntime -Ikernels -I$(LUA_INC) $(SAN)
LDLIBS := -lm -ldl -lpthread
# PCRE2 (the tokenizer's pre-tokenizer regexes) is linked statically, like Lua, for the GPU image
PCRE2_A ?= /usr/lib/$(MULTIARCH)/libpcre2-8.a
NVCCFLAGS := -O3 -std=c++17 -lineinfo -gencode=arch=compute_90a,code=sm_90a \
             -Xcompiler -fPIC,-Wall -Iruntime -Ikernels --expt-relaxed-constexpr -Xptxas -v,-warn-spills

CORE := err dtype alloc stream tensor ops gemm upload safetensors nn linear moe attention tokenizer sampling \
        ltensor lstream lsafetensors lnn llayers ltokenizer lsampling lcore host
CORE_OBJ := $(CORE:%=$(BUILD)/obj/runtime/%.o) $(BUILD)/obj/gen/lua_embedded.o
ifeq ($(CUDA),1)
KERNEL_SRC := $(wildcard kernels/*.cu)
KERNEL_OBJ := $(KERNEL_SRC:kernels/%.cu=$(BUILD)/obj/kernels/%.o)
CUDA_LIBS := -L$(CUDA_HOME)/lib64 -lcudart_static -lcublas -lcublasLt -lrt -Wl,-rpath,$(CUDA_HOME)/lib64
LINK := g++ -static-libstdc++ -static-libgcc
# the kernel timeline's CUPTI library ships with the toolkit, though not with every install of it
TIMELINE_SO := $(if $(wildcard $(CUDA_HOME)/include/cupti.h),$(BUILD)/kernel_timeline.so)
else
KERNEL_OBJ := $(BUILD)/obj/runtime/nocuda.o
CUDA_LIBS :=
LINK := $(CC)
endif
LIB_OBJ := $(CORE_OBJ) $(KERNEL_OBJ)
LUA_SRC := $(shell find lua -name '*.lua' | sort)
C_TESTS := $(wildcard tests/c/test_*.c)

.PHONY: all setup test test-gpu memcheck-gpu asan demo bench clean
all: $(BUILD)/dsrt $(BUILD)/libdsrt.a $(BUILD)/libdsrt.so $(BUILD)/lua/dsrt/core.so $(BUILD)/test_c \
     $(BUILD)/embed_example $(BUILD)/host_sampler.so $(TIMELINE_SO)
	@[ "$(CUDA)" = 1 ] || echo "dsrt: nvcc not found, building for the CPU only"

$(BUILD)/obj/runtime/%.o: runtime/%.c $(wildcard runtime/*.h) kernels/kernels.h
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -c $< -o $@
$(BUILD)/obj/kernels/%.o: kernels/%.cu $(wildcard kernels/*.cuh) kernels/kernels.h runtime/numeric.h runtime/opmath.h
	@mkdir -p $(@D)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@ 2> $@.log || { cat $@.log >&2; rm -f $@; exit 1; }
	@tools/check_ptxas.sh $@.log || { rm -f $@; exit 1; }
$(BUILD)/gen/lua_embedded.c: tools/embed_lua.lua $(LUA_SRC)
	@mkdir -p $(@D)
	lua5.4 tools/embed_lua.lua lua $@
$(BUILD)/obj/gen/lua_embedded.o: $(BUILD)/gen/lua_embedded.c runtime/dsrt.h
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libdsrt.a: $(LIB_OBJ)
	rm -f $@ && ar rcs $@ $^
$(BUILD)/libdsrt.so: $(LIB_OBJ)
	$(LINK) -shared -fopenmp $(SAN) -o $@ $^ $(PCRE2_A) $(CUDA_LIBS) $(LDLIBS)
# stock lua5.4 finds luaopen_dsrt_core in dsrt/core.so on package.cpath
$(BUILD)/lua/dsrt/core.so: $(BUILD)/libdsrt.so
	@mkdir -p $(@D)
	cp $< $@
# Lua, lua-cjson, readline and OpenMP are linked statically: the program runs where none is installed
$(BUILD)/dsrt: $(BUILD)/obj/runtime/main.o $(BUILD)/libdsrt.a
	$(LINK) $(SAN) -o $@ $< $(BUILD)/libdsrt.a $(PCRE2_A) $(LUA_A) $(CJSON_A) \
	  -Wl,-Bstatic -lreadline -ltinfo -lgomp -Wl,-Bdynamic $(CUDA_LIBS) $(LDLIBS)
# the wall-clock sampler tools/host_report.py reads (preloaded: tools/host_profile.sh)
$(BUILD)/host_sampler.so: tools/host_sampler.c
	$(CC) -std=c17 -O2 -Wall -Wextra -Werror -fPIC -shared $< -o $@

# the kernel timeline (CUPTI's activity records; tools/timeline.sh), loaded by CUDA as its injection hook
$(BUILD)/kernel_timeline.so: tools/kernel_timeline.c
	$(CC) -std=c17 -O2 -Wall -Wextra -Werror -fPIC -shared -I$(CUDA_HOME)/include $< -o $@ \
	  -L$(CUDA_HOME)/lib64 -lcupti -Wl,-rpath,$(CUDA_HOME)/lib64

# the README's embedding example, built as a host would build it
$(BUILD)/embed_example: examples/embed.c $(BUILD)/libdsrt.a
	$(CC) $(CFLAGS) -c $< -o $(BUILD)/obj/embed.o
	$(LINK) $(SAN) -fopenmp -o $@ $(BUILD)/obj/embed.o $(BUILD)/libdsrt.a $(PCRE2_A) $(LUA_A) $(CUDA_LIBS) $(LDLIBS)
$(BUILD)/obj/tests/%.o: tests/c/%.c tests/c/check.h $(wildcard runtime/*.h)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -c $< -o $@
$(BUILD)/test_c: $(C_TESTS:tests/c/%.c=$(BUILD)/obj/tests/%.o) $(BUILD)/libdsrt.a
	$(LINK) $(SAN) -fopenmp -o $@ $^ $(PCRE2_A) $(LUA_A) $(CUDA_LIBS) $(LDLIBS)

setup:
	@tools/setup.sh

# Each suite prints its own `N passed, N failed`; tools/total.sh adds them up for the closing line.
test: setup
	@$(MAKE) --no-print-directory all
	@tools/total.sh "$(BUILD)/test_c" \
	  "$(BUILD)/dsrt tests/run.lua tests/lua" \
	  "env 'LUA_PATH=lua/?.lua;lua/?/init.lua;;' 'LUA_CPATH=$(BUILD)/lua/?.so;;' lua5.4 tests/run.lua tests/lua/test_module.lua" \
	  "tests/tools/test_check_ptxas.sh" "tests/tools/test_host_profile.sh" "tests/tools/test_timeline.sh"

# test-gpu and bench run on the GPU machine over a build/ made here: they never rebuild there
test-gpu:
	@test -x $(BUILD)/dsrt || { echo "build first (make), then run make test-gpu where the GPU is"; exit 1; }
	@tools/total.sh "$(BUILD)/test_c --gpu" "$(BUILD)/dsrt tests/run.lua tests/gpu" \
	  "$(MAKE) --no-print-directory memcheck-gpu BUILD=$(BUILD)"

# compute-sanitizer's memcheck over one full forward of the tiny model on CUDA (prefill, 2 decode steps,
# an MTP draft: tests/gpu/model_forward.lua) and over MoE layers at widths the tiny model's decode does
# not take (tests/gpu/moe_forward.lua: the warpgroup tile), counted as one test each; skipped, saying
# so, without the tool
SANITIZER ?= $(shell command -v compute-sanitizer 2>/dev/null || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
memcheck-gpu:
	@if [ -z "$(SANITIZER)" ]; then echo "memcheck: compute-sanitizer not found, skipped"; echo "memcheck: 0 passed, 0 failed"; exit 0; fi; \
	if ! { test -f $(BUILD)/tiny-memcheck/config.json || \
	       $(BUILD)/dsrt scripts/make_tiny_model.lua $(BUILD)/tiny-memcheck --seed 3 --no-tokenizer >/dev/null; }; then \
	  echo "memcheck: the tiny model could not be written"; echo "memcheck: 0 passed, 1 failed"; exit 1; fi; \
	passed=0; failed=0; \
	if "$(SANITIZER)" --tool memcheck --error-exitcode 1 $(BUILD)/dsrt tests/gpu/model_forward.lua $(BUILD)/tiny-memcheck; \
	then passed=$$((passed + 1)); else failed=$$((failed + 1)); fi; \
	if "$(SANITIZER)" --tool memcheck --error-exitcode 1 $(BUILD)/dsrt tests/gpu/moe_forward.lua; \
	then passed=$$((passed + 1)); else failed=$$((failed + 1)); fi; \
	echo "memcheck: $$passed passed, $$failed failed"; [ $$failed -eq 0 ]

asan: setup
	@$(MAKE) --no-print-directory BUILD=build-asan CUDA=0 OPT=-O1 \
	  SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" all
	@ASAN_OPTIONS=detect_leaks=1 tools/total.sh \
	  "build-asan/test_c" "build-asan/dsrt tests/run.lua tests/lua"

demo: setup
	@$(MAKE) --no-print-directory all
	@test -f $(BUILD)/tiny/config.json || $(BUILD)/dsrt scripts/make_tiny_model.lua $(BUILD)/tiny --seed 1
	@$(BUILD)/dsrt scripts/demo.lua $(BUILD)/tiny

# BENCH_ARGS: --quick, --context N, --steps N (the DeepSeek-V4 slice and the transformers comparison)
bench:
	@test -x $(BUILD)/dsrt || { echo "build first (make), then run make bench where the GPU is"; exit 1; }
	@st=0; $(BUILD)/dsrt scripts/bench.lua $(filter --quick,$(BENCH_ARGS)) || st=1; \
	$(BUILD)/dsrt scripts/bench_dsv4.lua $(BENCH_ARGS) || st=1; \
	$(BUILD)/dsrt scripts/bench_speculative.lua $(filter --quick,$(BENCH_ARGS)) || st=1; \
	if python3 -c "import torch, transformers" 2>/dev/null; then python3 tests/oracle/bench_transformers.py $(BENCH_ARGS) || st=1; \
	else echo "bench: python3 cannot import torch and transformers: the transformers comparison is skipped"; fi; exit $$st

clean:
	rm -rf $(BUILD) build-asan
