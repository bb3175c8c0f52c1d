package main

import (
	"context"
	"runtime"
	"sync"
	"testing"
	"time"
)

func TestTrimmer(t *testing.T) {
	var tr trimmer
	tr.trimmed(10 << 20)
	steps := []struct {
		held, free uint64
		want       bool
	}{
		{10 << 20, 0, false},
		{10<<20 + memTrimMin - 1, memTrimMin - 1, false}, // slack of a busy heap
		{8 << 20, 0, false},                              // lower: the new base
		{8<<20 + memTrimMin, 0, true},                    // a burst's growth
		{8 << 20, memTrimMin, true},                      // a burst collected, its pages not returned
	}
	for i, s := range steps {
		if got := tr.due(s.held, s.free); got != s.want {
			t.Errorf("step %d: due(%d, %d) = %v, want %v", i, s.held, s.free, got, s.want)
		}
	}

	// A trim during a burst: held stays the burst's, without growth or
	// free spans, until memTrimStale looks have passed.
	tr = trimmer{}
	tr.trimmed(10 << 20)
	tr.trimmed(30 << 20) // the burst was live
	for i := 1; i < memTrimStale; i++ {
		if tr.due(30<<20, 0) {
			t.Fatalf("look %d after a trim during a burst: due", i)
		}
	}
	if !tr.due(30<<20, 0) {
		t.Fatalf("look %d after a trim during a burst: not due", memTrimStale)
	}
	tr.trimmed(29 << 20) // the same heap again: it is live, the new floor
	for i := range 2 * memTrimStale {
		if tr.due(29<<20, 0) {
			t.Fatalf("look %d with a larger live heap: due", i)
		}
	}
}

// sink keeps the burst's buffers reachable from the heap while they are
// in use.
var sink [][]byte

// TestTrimMemory: after a burst (64 MiB, then garbage, no collection
// since), trimMemory returns the heap to about what it was within a few
// of its periods; the runtime alone would hold it until its next
// collection.
func TestTrimMemory(t *testing.T) {
	runtime.GC()
	runtime.GC()
	before := readHeapHeld()
	startTrim(t)

	for range 64 {
		b := make([]byte, 1<<20)
		b[0] = 1
		sink = append(sink, b)
	}
	sink = nil
	if held := readHeapHeld(); held < before+32<<20 {
		t.Fatalf("burst not held: %d bytes before, %d after", before, held)
	}
	deadline := time.Now().Add(3 * memTrimEvery)
	for readHeapHeld() >= before+memTrimMin {
		if time.Now().After(deadline) {
			t.Fatalf("%d bytes of heap held after %v (%d before the burst)", readHeapHeld(), 3*memTrimEvery, before)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// startTrim does what trimMemory does until the test ends: the first trim
// before it returns (so that it is not taken in the middle of the test's
// burst), the loop in a goroutine.
func startTrim(t *testing.T) {
	var tr trimmer
	trim(&tr)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); trimLoop(ctx, &tr) }()
	t.Cleanup(func() { cancel(); <-done })
}

// waitHeldBelow waits until the heap held is under limit, for at most
// three trim periods.
func waitHeldBelow(t *testing.T, limit uint64) {
	t.Helper()
	deadline := time.Now().Add(3 * memTrimEvery)
	for readHeapHeld() >= limit {
		if time.Now().After(deadline) {
			t.Fatalf("%d bytes of heap held after %v, want under %d", readHeapHeld(), 3*memTrimEvery, limit)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestTrimMemoryPooled: a burst's buffers that went back to a sync.Pool
// are returned too. One collection only moves them to the pool's victim
// cache: a trim that collected once still held them, took that as its
// base, and never trimmed them.
func TestTrimMemoryPooled(t *testing.T) {
	runtime.GC()
	runtime.GC()
	before := readHeapHeld()
	startTrim(t)
	var pool sync.Pool
	bufs := make([][]byte, 32)
	for i := range bufs {
		bufs[i] = make([]byte, 1<<20)
		bufs[i][0] = 1
	}
	for _, b := range bufs {
		pool.Put(&b)
	}
	bufs = nil
	if held := readHeapHeld(); held < before+16<<20 {
		t.Fatalf("burst not held: %d bytes before, %d after", before, held)
	}
	waitHeldBelow(t, before+memTrimMin)
	runtime.KeepAlive(&pool)
}

// TestTrimMemoryAtStart: what starting left as garbage is returned when
// trimMemory starts, without waiting for a burst's growth.
func TestTrimMemoryAtStart(t *testing.T) {
	runtime.GC()
	runtime.GC()
	before := readHeapHeld()
	for range 3 { // garbage under memTrimMin, no collection since
		b := make([]byte, 1<<20)
		b[0] = 1
		sink = append(sink, b)
	}
	sink = nil
	if held := readHeapHeld(); held < before+2<<20 {
		t.Fatalf("garbage not held: %d bytes before, %d after", before, held)
	}
	var tr trimmer
	trim(&tr) // trimMemory's first step
	if held := readHeapHeld(); held >= before+1<<20 {
		t.Fatalf("%d bytes of heap held after the first trim, %d before the garbage", held, before)
	}
}

// TestTrimMemoryBurstInBase: a trim in the middle of a burst takes the
// burst as its base; once the burst is collected, its free pages are
// returned all the same.
func TestTrimMemoryBurstInBase(t *testing.T) {
	runtime.GC()
	runtime.GC()
	before := readHeapHeld()
	for range 32 {
		b := make([]byte, 1<<20)
		b[0] = 1
		sink = append(sink, b)
	}
	var tr trimmer
	trim(&tr) // the burst is live: the base is the burst's
	sink = nil
	runtime.GC() // the burst is free, not returned
	if _, free := readHeap(); free < 16<<20 {
		t.Fatalf("burst not held free: %d bytes free", free)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); trimLoop(ctx, &tr) }()
	defer func() { cancel(); <-done }()
	waitHeldBelow(t, before+memTrimMin)
}
