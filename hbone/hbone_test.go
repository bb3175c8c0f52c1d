package hbone

import (
	"bytes"
	"context"
	"io"
	"net"
	"testing"
	"time"
)

func TestEcho(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, nil)
	d := e.dialer()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := d.Dial(ctx, e.request())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Peer() != e.srvID {
		t.Errorf("peer %v, want %v", s.Peer(), e.srvID)
	}
	if _, err := s.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, []byte("hello")) {
		t.Fatalf("got %q", got)
	}
	_ = net.IPv4len
}
