package hbone

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-accepted
	if s == nil {
		t.Fatal("accept failed")
	}
	return c, s
}

// TestJoin proxies between two TCP connections (spliced) and between a
// Stream and a TCP connection (buffered), with half-close both ways.
func TestJoin(t *testing.T) {
	checkGoroutines(t)
	t.Run("tcp", func(t *testing.T) {
		client, a := tcpPair(t)
		b, server := tcpPair(t)
		testJoin(t, client, a, b, server)
	})
	t.Run("stream", func(t *testing.T) {
		// client -> HBONE -> [Join in the test's pod handler] is covered
		// elsewhere; here the Stream itself is one side of Join.
		e := newEnv(t, echo, nil)
		s, err := e.dialer().Dial(testCtx(t), e.request())
		if err != nil {
			t.Fatal(err)
		}
		client, a := tcpPair(t)
		aToB, bToA, errc := joinAsync(a, s)
		io.WriteString(client, strings.Repeat("ping", 1000))
		client.(*net.TCPConn).CloseWrite()
		got, _ := io.ReadAll(client)
		client.Close()
		if string(got) != strings.Repeat("ping", 1000) {
			t.Fatalf("echo through Join: %d bytes", len(got))
		}
		if n, m, err := <-aToB, <-bToA, <-errc; n != 4000 || m != 4000 || err != nil {
			t.Fatalf("Join = %d, %d, %v; want 4000, 4000, nil", n, m, err)
		}
	})
	t.Run("context", func(t *testing.T) {
		client, a := tcpPair(t)
		b, server := tcpPair(t)
		defer client.Close()
		defer server.Close()
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { _, _, err := Join(ctx, a, b); done <- err }()
		cancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("Join: %v, want context.Canceled", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Join ignored its context")
		}
	})
}

func joinAsync(a, b net.Conn) (<-chan int64, <-chan int64, <-chan error) {
	aToB, bToA, errc := make(chan int64, 1), make(chan int64, 1), make(chan error, 1)
	go func() {
		n, m, err := Join(context.Background(), a, b)
		aToB <- n
		bToA <- m
		errc <- err
	}()
	return aToB, bToA, errc
}

func testJoin(t *testing.T, client, a, b, server net.Conn) {
	aToB, bToA, errc := joinAsync(a, b)
	// client -> server, then half-close; server answers after EOF.
	io.WriteString(client, "request")
	client.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(server)
	if err != nil || string(got) != "request" {
		t.Fatalf("server read %q, %v", got, err)
	}
	io.WriteString(server, "response!")
	server.(*net.TCPConn).CloseWrite()
	got, err = io.ReadAll(client)
	if err != nil || string(got) != "response!" {
		t.Fatalf("client read %q, %v", got, err)
	}
	if n, m, err := <-aToB, <-bToA, <-errc; n != 7 || m != 9 || err != nil {
		t.Fatalf("Join = %d, %d, %v; want 7, 9, nil", n, m, err)
	}
	client.Close()
	server.Close()
}

// TestJoinError: when one direction fails, the other (idle) one is not
// left hanging.
func TestJoinError(t *testing.T) {
	checkGoroutines(t)
	client, a := tcpPair(t)
	b, server := tcpPair(t)
	defer server.Close()
	errc := make(chan error, 1)
	go func() { _, _, err := Join(context.Background(), a, b); errc <- err }()
	// The client resets its connection; the server side stays silent.
	client.(*net.TCPConn).SetLinger(0)
	client.Close()
	select {
	case <-errc:
	case <-time.After(5 * time.Second):
		t.Fatal("Join hung after one side was reset")
	}
}
