#!/bin/sh
# Regenerates the objdiff fixtures with kernel-like flags (fentry calls,
# kernel code model, no red zone): before.o as the kernel is built,
# before-fs.o and after-fs.o with function and data sections.
set -e
cd "$(dirname "$0")"
F="-O2 -c -pg -mfentry -mrecord-mcount -mcmodel=kernel -fno-pic -mno-red-zone -fno-asynchronous-unwind-tables -g"
gcc $F before.c -o before.o
gcc $F -ffunction-sections -fdata-sections before.c -o before-fs.o
gcc $F -ffunction-sections -fdata-sections after.c -o after-fs.o
