package main

import (
	"context"
	"runtime"
	"testing"
	"time"
)

func TestTrimmer(t *testing.T) {
	var tr trimmer
	tr.trimmed(10 << 20)
	steps := []struct {
		held uint64
		want bool
	}{
		{10 << 20, false},
		{10<<20 + memTrimMin - 1, false}, // slack of a busy heap
		{8 << 20, false},                 // lower: the new base
		{8<<20 + memTrimMin, true},       // a burst's growth
	}
	for i, s := range steps {
		if got := tr.due(s.held); got != s.want {
			t.Errorf("step %d: due(%d) = %v, want %v", i, s.held, got, s.want)
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
	before := readHeapHeld()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); trimMemory(ctx) }()
	defer func() { cancel(); <-done }()

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
