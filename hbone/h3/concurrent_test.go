package h3

import (
	"context"
	"crypto/sha256"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/hbone"
)

// TestConcurrentBothWays: both directions flow at once, each side
// half-closing when its payload is out, on both transports, a few times.
// The handler's context lives on after its own half-close (the QUIC
// stream's context does not: it ends with the write side).
func TestConcurrentBothWays(t *testing.T) {
	up, down := payload(3, 4<<20+8), payload(4, 3<<20)
	got := make(chan [32]byte, 16)
	handler := func(ctx context.Context, r *hbone.Request) {
		st, err := r.Accept()
		if err != nil {
			return
		}
		var wg sync.WaitGroup
		wg.Go(func() {
			st.Write(down)
			st.CloseWrite()
		})
		h := sha256.New()
		io.Copy(h, st)
		wg.Wait()
		var s [32]byte
		copy(s[:], h.Sum(nil))
		if ctx.Err() != nil {
			s = [32]byte{} // reported as a mismatch
		}
		got <- s
	}
	e := newEnv(t, handler, nil)
	for _, tr := range e.transports(e.certs) {
		t.Run(tr.name, func(t *testing.T) {
			for i := range 5 {
				ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
				st, err := tr.dial(ctx, e.request(tr))
				cancel()
				if err != nil {
					t.Fatal(err)
				}
				var wg sync.WaitGroup
				var werr error
				wg.Go(func() {
					_, werr = st.Write(up)
					if werr == nil {
						werr = st.CloseWrite()
					}
				})
				b, rerr := io.ReadAll(st)
				wg.Wait()
				st.Close()
				if werr != nil || rerr != nil || sha256.Sum256(b) != sha256.Sum256(down) {
					t.Fatalf("round %d: write %v, read %v (%d bytes, want %d)", i, werr, rerr, len(b), len(down))
				}
				select {
				case s := <-got:
					if s != sha256.Sum256(up) {
						t.Fatalf("round %d: server got a different payload, or its context ended", i)
					}
				case <-time.After(20 * time.Second):
					t.Fatalf("round %d: server never finished", i)
				}
			}
		})
	}
}
