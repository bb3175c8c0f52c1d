package main

import (
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
)

// Go runtime defaults for a node proxy (issue 18):
//
//   - GOGC stays at Go's 100. ztunnel's live heap is small (3-5 MB at
//     1000 req/s over 64 connections) and so is its garbage (~150 bytes a
//     request: a collection every ~30 s at that rate), and its RSS is mostly
//     the binary's pages (15 of 23-28 MB in meshbench, file-backed). What
//     the heap adds at rate is buffers a burst left behind, which
//     trimMemory returns (memtrim.go), not the collector's headroom:
//     GOGC=50 measured the same RSS at rate within the runs' noise (28.3
//     vs 23.6-28.4 MB) and slightly more CPU per request (0.97x vs 0.86-0.90x
//     HAProxy's at 1 connection), and GOMEMLIMIT=8MiB with GOGC=50 cost 2-3x
//     the CPU per request (bench/README.md, issue 18).
//   - GOMEMLIMIT, unless set in the environment, is 90% of the container's
//     memory limit (cgroup v2 memory.max), when it has one: under a burst of
//     connections the collector works harder near the limit instead of the
//     kernel killing the proxy of every pod on the node at it. Without a
//     limit there is no soft limit either.
//   - GOMAXPROCS is the runtime's: since Go 1.25 it follows the container's
//     CPU limit.

// memoryLimitFraction is the share of the container's memory limit used as
// the Go soft memory limit: the rest is for what the Go runtime does not
// count (the binary's text, thread stacks outside Go, kernel socket
// buffers charged to the cgroup).
const memoryLimitFraction = 0.9

// setMemoryLimit applies the GOMEMLIMIT default and returns the limit set
// in bytes (0: none).
func setMemoryLimit() int64 {
	if os.Getenv("GOMEMLIMIT") != "" {
		return 0
	}
	max := cgroupMemoryMax()
	if max <= 0 {
		return 0
	}
	limit := int64(float64(max) * memoryLimitFraction)
	debug.SetMemoryLimit(limit)
	return limit
}

// cgroupMemoryMax returns this process's cgroup v2 memory.max, or 0 when
// there is none (unlimited, cgroup v1, not readable).
func cgroupMemoryMax() int64 {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		path, ok := strings.CutPrefix(line, "0::")
		if !ok {
			continue
		}
		v, err := os.ReadFile(filepath.Join("/sys/fs/cgroup", path, "memory.max"))
		if err != nil {
			return 0
		}
		n, err := strconv.ParseInt(strings.TrimSpace(string(v)), 10, 64)
		if err != nil { // "max"
			return 0
		}
		return n
	}
	return 0
}
