package waypoint

import (
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// TestLazyReadDeadline: a deadline that passes fails a blocked Read (and
// later ones) as the connection's own would; one cleared or moved before it
// passes does not; a deadline in the past fails a Read at once.
func TestLazyReadDeadline(t *testing.T) {
	cli, srv := net.Pipe()
	defer cli.Close()
	defer srv.Close()
	f := newFraming(cli, 0)
	readErr := func() chan error {
		ch := make(chan error, 1)
		go func() {
			_, err := f.Read(make([]byte, 1))
			ch <- err
		}()
		return ch
	}

	// Passes while a Read waits: the Read fails with the deadline error.
	start := time.Now()
	f.SetReadDeadline(start.Add(50 * time.Millisecond))
	select {
	case err := <-readErr():
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("read: %v, want a deadline error", err)
		}
		if d := time.Since(start); d < 50*time.Millisecond {
			t.Errorf("failed after %v, before its deadline", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("deadline did not fail the read")
	}
	if _, err := f.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("next read: %v, want a deadline error", err)
	}

	// Cleared: reads wait for data again; set and cleared before it passes,
	// and moved later before it passes: the read gets its byte.
	f.SetReadDeadline(time.Time{})
	f.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	f.SetReadDeadline(time.Time{})
	f.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
	f.SetReadDeadline(time.Now().Add(time.Hour))
	ch := readErr()
	time.Sleep(100 * time.Millisecond) // past the cleared and the moved deadlines
	if _, err := srv.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := <-ch; err != nil {
		t.Errorf("read after cleared/moved deadlines: %v", err)
	}

	// In the past: at once.
	f.SetReadDeadline(aLongTimeAgo)
	if _, err := f.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("past deadline: %v", err)
	}
	f.SetReadDeadline(time.Time{})
	go srv.Write([]byte("y"))
	if _, err := io.ReadFull(f, make([]byte, 1)); err != nil {
		t.Errorf("after clearing a past deadline: %v", err)
	}
	f.Close()
}
