package app

import (
	"io"
	"net"
	"net/http"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// TestHTTPServesGRPC: one port, both protocols: HTTP/1.1 as before, gRPC
// (prior-knowledge HTTP/2) to the health service, named in its header
// metadata, failing every second call UNAVAILABLE with FailRatio 0.5.
func TestHTTPServesGRPC(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &HTTP{Name: "g-1", FailRatio: 0.5}
	done := make(chan error, 1)
	go func() { done <- h.Serve(ln) }()
	t.Cleanup(func() {
		h.Close()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	resp, err := http.Get("http://" + ln.Addr().String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("X-Ambit-App") != "g-1" {
		t.Fatalf("HTTP: %d %v", resp.StatusCode, resp.Header)
	}
	conn, err := grpc.NewClient("passthrough:///"+ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	var ok, unavailable int
	for range 10 {
		var md metadata.MD
		_, err := hc.Check(t.Context(), &healthpb.HealthCheckRequest{}, grpc.Header(&md))
		switch status.Code(err) {
		case codes.OK:
			ok++
			if got := md.Get(HeaderGRPCApp); len(got) != 1 || got[0] != "g-1" {
				t.Errorf("header %s = %v", HeaderGRPCApp, got)
			}
		case codes.Unavailable:
			unavailable++
		default:
			t.Fatalf("Check: %v", err)
		}
	}
	if ok != 5 || unavailable != 5 {
		t.Errorf("%d OK, %d UNAVAILABLE; want 5 and 5 (the HTTP request was the first of 11)", ok, unavailable)
	}
	if served, failed := h.Counts(); served != 11 || failed != 5 {
		t.Errorf("counts %d served, %d failed; want 11, 5", served, failed)
	}
}
