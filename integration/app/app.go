// Package app is the small workload that integration tests, the demo and the
// benchmarks run inside pods: an echo server that first tells the client who
// it is and which peer address it saw, and a client that checks every byte it
// gets back. Seeing the peer address is how tests prove that ztunnel delivers
// with the client's real source IP.
package app

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"
)

// Server echoes every connection after a one-line greeting:
//
//	ambit-app <name> peer=<ip:port>\n
//
// The zero value is usable; Serve may be called once.
type Server struct {
	// Name identifies the server in its greeting (usually the pod name).
	Name string
	// Logger receives errors; nil discards them.
	Logger *slog.Logger

	mu     sync.Mutex // guards ln, conns, closed
	ln     net.Listener
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup // connection goroutines
}

// Serve accepts connections on ln until Close. It returns nil after Close.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return nil
	}
	s.ln = ln
	s.conns = map[net.Conn]struct{}{}
	s.mu.Unlock()
	for {
		c, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("app server %s: accept: %w", s.Name, err)
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return nil
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.handle(c)
	}
}

func (s *Server) handle(c net.Conn) {
	defer s.wg.Done()
	defer func() {
		c.Close()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
	if _, err := fmt.Fprintf(c, "ambit-app %s peer=%s\n", s.Name, c.RemoteAddr()); err != nil {
		return
	}
	if _, err := io.Copy(c, c); err != nil {
		logger(s.Logger).Debug("app echo", "server", s.Name, "peer", c.RemoteAddr().String(), "err", err)
		return
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

// Close stops the server and its connections and waits for them. It is
// idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	var err error
	if s.ln != nil {
		err = s.ln.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return err
}

// Result is what one client exchange observed.
type Result struct {
	Server   string        // the server's name from its greeting
	PeerSeen string        // the address the server saw for the client
	Bytes    int           // payload bytes echoed and verified
	Duration time.Duration // from dial to verified echo
}

// Exchange dials with dial, reads the greeting, sends payload bytes of
// pseudo-random data, half-closes, and checks that exactly the same bytes come
// back. Any difference is an error.
func Exchange(ctx context.Context, dial func(ctx context.Context) (net.Conn, error), payload int) (Result, error) {
	start := time.Now()
	c, err := dial(ctx)
	if err != nil {
		return Result{}, fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		return Result{}, fmt.Errorf("read greeting: %w", err)
	}
	var res Result
	if _, err := fmt.Sscanf(strings.TrimSpace(line), "ambit-app %s peer=%s", &res.Server, &res.PeerSeen); err != nil {
		return Result{}, fmt.Errorf("bad greeting %q: %w", line, err)
	}
	data := pattern(payload)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			if cw, ok := c.(interface{ CloseWrite() error }); ok {
				err = cw.CloseWrite()
			}
		}
		werr <- err
	}()
	h := sha256.New()
	n, err := io.Copy(h, br)
	if err != nil {
		return Result{}, fmt.Errorf("read echo: %w", err)
	}
	if err := <-werr; err != nil {
		return Result{}, fmt.Errorf("write: %w", err)
	}
	want := sha256.Sum256(data)
	if n != int64(len(data)) || !bytes.Equal(h.Sum(nil), want[:]) {
		return Result{}, fmt.Errorf("echo mismatch: sent %d bytes, got %d back (or different content)", len(data), n)
	}
	res.Bytes = len(data)
	res.Duration = time.Since(start)
	return res, nil
}

// Marker is a plaintext string inside every payload, so a packet capture can
// tell whether payload crossed a link in clear.
const Marker = "AMBIT-PLAINTEXT-MARKER"

func pattern(n int) []byte {
	b := make([]byte, n)
	x := uint32(2463534242)
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	for i := 0; i+len(Marker) <= n; i += 1024 {
		copy(b[i:], Marker)
	}
	return b
}

func logger(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}
