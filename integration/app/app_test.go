package app

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"
)

func TestExchangeVerifiesEcho(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Name: "b1"}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	defer func() {
		s.Close()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dial := func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", ln.Addr().String())
	}
	res, err := Exchange(ctx, dial, 3<<20)
	if err != nil {
		t.Fatal(err)
	}
	if res.Server != "b1" || res.Bytes != 3<<20 || !strings.HasPrefix(res.PeerSeen, "127.0.0.1:") {
		t.Fatalf("result %+v", res)
	}

	// A server that corrupts the stream is caught.
	bad, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	go func() {
		c, err := bad.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write([]byte("ambit-app evil peer=1.2.3.4:5\n"))
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				buf[0] ^= 0xff
				c.Write(buf[:n])
			}
			if err != nil {
				c.(*net.TCPConn).CloseWrite()
				return
			}
		}
	}()
	_, err = Exchange(ctx, func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", bad.Addr().String())
	}, 10000)
	if err == nil || !strings.Contains(err.Error(), "mismatch") {
		t.Fatalf("corrupted echo not detected: %v", err)
	}
}
