package main

import (
	"context"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Returning memory after a burst (issue 18). The Go runtime keeps the heap
// it grew to for a bulk transfer (a stream buffers up to its 4 MiB window,
// the copy and batch buffers are pooled) until a collection lowers the heap
// goal, and at a few bytes of garbage per request a quiet proxy collects
// rarely (the runtime forces one every 2 minutes): its RSS stays at the
// burst's. trimMemory looks every memTrimEvery and, when the heap the
// process holds (live, dead and free spans not returned to the OS) grew
// by memTrimMin since the last trim, or its free spans not returned to the
// OS reached memTrimMin (a collection after a burst frees the burst's
// buffers, but the runtime returns their pages only slowly, and a trim in
// the middle of the burst had taken the burst as its base; and when that
// base is still a burst's memTrimStale looks later, because without a
// collection a burst's garbage shows as neither), collects and
// returns the free pages: two full collections of a heap of a few MB, at
// most once per memTrimEvery. Two, because a burst's buffers sit in sync.Pools (the
// relay's and the stream's copy buffers): a collection moves a pool's
// objects to its victim cache and only the next one frees them, so after
// one collection the burst was still held, and the trim's new base was the
// burst's. It trims once when it starts as well: what starting left behind
// (parsing the capture's ELF and BTF, the config, the certificates) is
// garbage by then, and at a few bytes of garbage per request the first
// collection could be minutes away.
const (
	memTrimEvery = 5 * time.Second
	memTrimMin   = 4 << 20
)

// heapHeld is the heap memory the process holds: objects (live, or dead
// until the next collection), free spans not returned to the OS, and
// unused parts of spans.
var heapHeld = []metrics.Sample{
	{Name: "/memory/classes/heap/objects:bytes"},
	{Name: "/memory/classes/heap/free:bytes"},
	{Name: "/memory/classes/heap/unused:bytes"},
}

// readHeap returns the heap held and, of it, the free spans not returned
// to the OS.
func readHeap() (held, free uint64) {
	s := make([]metrics.Sample, len(heapHeld))
	copy(s, heapHeld)
	metrics.Read(s)
	for _, v := range s {
		held += v.Value.Uint64()
	}
	return held, s[1].Value.Uint64()
}

func readHeapHeld() uint64 {
	held, _ := readHeap()
	return held
}

// trimMemory runs until ctx ends.
func trimMemory(ctx context.Context) {
	var tr trimmer
	trim(&tr)
	trimLoop(ctx, &tr)
}

// trimLoop trims every memTrimEvery when tr says it is due, until ctx
// ends.
func trimLoop(ctx context.Context, tr *trimmer) {
	t := time.NewTicker(memTrimEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if tr.due(readHeap()) {
			trim(tr)
		}
	}
}

// trim collects twice (the second frees what the first moved to the
// sync.Pools' victim caches), returns the free pages to the OS and makes
// what is held after it tr's base.
func trim(tr *trimmer) {
	runtime.GC()
	debug.FreeOSMemory()
	tr.trimmed(readHeapHeld())
}

// memTrimStale is how many looks after a trim that left a burst held (the
// burst was still live: its base is memTrimMin over the floor) trimMemory
// trims again: once the burst ends its buffers are garbage, but without a
// collection they show neither as growth nor as free spans.
const memTrimStale = 3

// trimmer decides when to trim from the heap held at each look.
type trimmer struct {
	base  uint64 // the heap held after the last trim, or less since
	floor uint64 // the heap held after the trims, without a burst live in it
	stale int    // looks since the last trim while its base is a burst's
}

// due reports whether the heap held grew by memTrimMin over the base, or
// the free spans not returned to the OS reached memTrimMin, or the last
// trim was taken during a burst memTrimStale looks ago.
func (t *trimmer) due(held, free uint64) bool {
	if held < t.base {
		t.base = held
	}
	if t.base >= t.floor+memTrimMin {
		t.stale++
	} else {
		t.stale = 0
	}
	return held >= t.base+memTrimMin || free >= memTrimMin || t.stale >= memTrimStale
}

// trimmed records the heap held after a trim. The floor follows it down,
// and up when the trim was a burst's re-check and held about as much as
// the burst's: then what is held is the live heap, not a burst.
func (t *trimmer) trimmed(held uint64) {
	recheck := t.stale >= memTrimStale
	if t.floor == 0 || held < t.floor || recheck && held+memTrimMin > t.base {
		t.floor = held
	}
	t.base = held
	t.stale = 0
}
