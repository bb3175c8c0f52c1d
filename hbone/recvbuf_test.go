package hbone

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

func TestRecvBuf(t *testing.T) {
	var b recvBuf
	var want bytes.Buffer
	rng := rand.New(rand.NewPCG(1, 2))
	src := make([]byte, 3*recvChunkSize)
	for i := range src {
		src[i] = byte(rng.Uint32())
	}
	out := make([]byte, 2*recvChunkSize)
	for range 2000 {
		if rng.IntN(2) == 0 {
			p := src[:rng.IntN(len(src))]
			b.Write(p)
			want.Write(p)
		} else {
			p := out[:rng.IntN(len(out))]
			n := b.Read(p)
			w := want.Next(len(p))
			if !bytes.Equal(p[:n], w) {
				t.Fatalf("read %d bytes that differ from the %d written", n, len(w))
			}
		}
		if b.Len() != want.Len() {
			t.Fatalf("Len %d, want %d", b.Len(), want.Len())
		}
	}
	b.Reset()
	if b.Len() != 0 || len(b.chunks) != b.head || b.Read(out) != 0 {
		t.Fatal("Reset left data")
	}
}
