package hbone

import (
	"bytes"
	"net"
	"testing"
)

// writeRecorder is a net.Conn that records each Write.
type writeRecorder struct {
	net.Conn
	writes [][]byte
}

func (w *writeRecorder) Write(p []byte) (int, error) {
	w.writes = append(w.writes, bytes.Clone(p))
	return len(p), nil
}

func TestBatchConn(t *testing.T) {
	rec := &writeRecorder{}
	b := newBatchConn(rec)
	b.Write([]byte("handshake"))
	if len(rec.writes) != 1 {
		t.Fatalf("outside a batch: %d writes, want 1", len(rec.writes))
	}
	b.hold()
	b.Write([]byte("a"))
	b.Write([]byte("b"))
	if len(rec.writes) != 1 {
		t.Fatalf("batch sent before flush: %q", rec.writes)
	}
	if err := b.flush(); err != nil {
		t.Fatal(err)
	}
	if len(rec.writes) != 2 || string(rec.writes[1]) != "ab" {
		t.Fatalf("after flush: %q, want one more write \"ab\"", rec.writes)
	}
	if err := b.flush(); err != nil || len(rec.writes) != 2 {
		t.Fatalf("empty flush: %v, %d writes", err, len(rec.writes))
	}

	// A batch over the limit sends what it has, in order, and goes on.
	rec.writes = nil
	b.hold()
	rec16 := bytes.Repeat([]byte{1}, 16<<10)
	total := 0
	for range batchLimit/len(rec16) + 2 {
		b.Write(rec16)
		total += len(rec16)
	}
	if len(rec.writes) != 1 || len(rec.writes[0]) != batchLimit {
		t.Fatalf("over the limit: %d writes, want 1 of %d bytes", len(rec.writes), batchLimit)
	}
	b.flush()
	sent := 0
	for _, w := range rec.writes {
		sent += len(w)
	}
	if len(rec.writes) != 2 || sent != total {
		t.Fatalf("after flush: %d writes, %d bytes; want 2, %d", len(rec.writes), sent, total)
	}
}
