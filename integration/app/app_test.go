package app

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
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

func TestHTTPFailRatioAndDelay(t *testing.T) {
	h, err := HTTPFromAnnotations("flaky-0", map[string]string{AnnotationProtocol: "http", AnnotationFailRatio: "0.5"})
	if err != nil || h == nil {
		t.Fatalf("annotations: %v, %v", h, err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- h.Serve(ln) }()
	defer func() {
		h.Close()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	var codes []int
	for range 6 {
		resp, err := http.Get("http://" + ln.Addr().String() + "/x")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		codes = append(codes, resp.StatusCode)
		if resp.StatusCode == 200 && !strings.HasPrefix(string(body), "ambit-app flaky-0 peer=127.0.0.1:") {
			t.Errorf("body %q", body)
		}
		if resp.Header.Get("X-Ambit-App") != "flaky-0" {
			t.Errorf("header %q", resp.Header.Get("X-Ambit-App"))
		}
	}
	if fmt.Sprint(codes) != "[200 503 200 503 200 503]" {
		t.Errorf("codes %v, want every second request failed", codes)
	}
	if s, f := h.Counts(); s != 6 || f != 3 {
		t.Errorf("counts %d served, %d failed", s, f)
	}
	// The counts path answers them and is not counted.
	for range 2 {
		resp, err := http.Get("http://" + ln.Addr().String() + CountsPath)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || strings.TrimSpace(string(body)) != `{"served":6,"failed":3}` {
			t.Errorf("%s: %d %q", CountsPath, resp.StatusCode, body)
		}
	}

	slow := &HTTP{Name: "slow", Delay: 300 * time.Millisecond}
	ln2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go slow.Serve(ln2)
	defer slow.Close()
	start := time.Now()
	resp, err := http.Get("http://" + ln2.Addr().String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if took := time.Since(start); resp.StatusCode != 200 || took < 300*time.Millisecond {
		t.Errorf("slow answered %d after %s", resp.StatusCode, took)
	}

	for _, bad := range []map[string]string{
		{AnnotationProtocol: "http", AnnotationFailRatio: "2"},
		{AnnotationProtocol: "http", AnnotationDelay: "soon"},
	} {
		if _, err := HTTPFromAnnotations("x", bad); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
	if h, err := HTTPFromAnnotations("x", nil); h != nil || err != nil {
		t.Errorf("no annotations: %v, %v", h, err)
	}
}
