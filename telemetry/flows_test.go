package telemetry

import (
	"bufio"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"
)

func flowOf(typ, verdict, srcNS, srcPod, dstNS, dstPod string) Flow {
	return Flow{Type: typ, Verdict: verdict,
		Source:      FlowPeer{Namespace: srcNS, Pod: srcPod, Workload: srcPod + "-wl", Identity: "spiffe://cluster.local/ns/" + srcNS + "/sa/a"},
		Destination: FlowPeer{Namespace: dstNS, Pod: dstPod, Workload: dstPod + "-wl"}}
}

func TestFlowFilter(t *testing.T) {
	fl := flowOf(FlowClose, VerdictDenied, "shop", "client-1", "bank", "server-1")
	for _, tc := range []struct {
		q    string
		want bool
	}{
		{"", true},
		{"namespace=shop", true},
		{"namespace=bank", true},
		{"namespace=other", false},
		{"pod=client-1", true},
		{"pod=server-1-wl", true},
		{"pod=bank/server-1", true},
		{"pod=shop/server-1", false},
		{"verdict=denied", true},
		{"verdict=allowed", false},
		{"identity=spiffe://cluster.local/ns/shop/sa/a", true},
		{"type=open", false},
		{"namespace=shop&verdict=denied&pod=server-1", true},
	} {
		q, _ := parseQuery(tc.q)
		f, err := ParseFlowFilter(q)
		if err != nil {
			t.Fatalf("%s: %v", tc.q, err)
		}
		if got := f.Match(&fl); got != tc.want {
			t.Errorf("%q: %v, want %v", tc.q, got, tc.want)
		}
		if f2, _ := ParseFlowFilter(f.Query()); f2 != f {
			t.Errorf("%q: Query round trip %+v", tc.q, f2)
		}
	}
	for _, bad := range []string{"verdict=maybe", "type=x"} {
		q, _ := parseQuery(bad)
		if _, err := ParseFlowFilter(q); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}

// A reader that does not keep up loses events, counted; others and the
// publisher are unaffected; recent events are replayed on subscription.
func TestFlowsBounded(t *testing.T) {
	f := &Flows{Node: "n1", Recent: 4, Buffer: 2}
	slow := f.Subscribe(FlowFilter{}, 0)
	denied := f.Subscribe(FlowFilter{Verdict: VerdictDenied}, 0)
	for i := range 6 {
		v := VerdictAllowed
		if i == 5 {
			v = VerdictDenied
		}
		f.Publish(Flow{Type: FlowClose, ID: uint64(i), Verdict: v})
	}
	if n := slow.TakeLost(); n != 4 {
		t.Errorf("slow reader lost %d, want 4", n)
	}
	if got := (<-slow.C()).ID; got != 0 {
		t.Errorf("first kept event %d", got)
	}
	if fl := <-denied.C(); fl.ID != 5 || fl.Node != "n1" || fl.Time.IsZero() || denied.TakeLost() != 0 {
		t.Errorf("filtered reader got %+v", fl)
	}
	if pub, dropped := f.Counts(); pub != 6 || dropped != 4 {
		t.Errorf("counts %d %d", pub, dropped)
	}
	late := f.Subscribe(FlowFilter{}, 2)
	for _, want := range []uint64{4, 5} {
		if got := (<-late.C()).ID; got != want {
			t.Errorf("replayed %d, want %d", got, want)
		}
	}
	slow.Close()
	f.Publish(Flow{})
	if len(slow.C()) != 1 { // still the one it had not read
		t.Errorf("closed reader received more")
	}
}

// Over HTTP: a stalled reader never slows Publish; once it reads again it
// is told how many events it lost.
func TestFlowsHTTPStalledReader(t *testing.T) {
	f := &Flows{Buffer: 16}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	for i := range 5 {
		f.Publish(Flow{Type: FlowClose, ID: uint64(i + 1)})
	}
	// Without follow: the recent events, then the end.
	resp, err := http.Get(srv.URL + "?last=3")
	if err != nil {
		t.Fatal(err)
	}
	lines := readLines(t, resp)
	if len(lines) != 3 || lines[0].ID != 3 || lines[2].ID != 5 {
		t.Fatalf("recent: %+v", lines)
	}
	if resp, err := http.Get(srv.URL + "?verdict=nope"); err != nil || resp.StatusCode != 400 {
		t.Fatalf("bad filter: %v %v", resp.Status, err)
	}

	resp, err = http.Get(srv.URL + "?follow=true")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	var hello Flow
	if line, err := br.ReadBytes('\n'); err != nil || json.Unmarshal(line, &hello) != nil || hello.Type != FlowHello {
		t.Fatalf("hello: %q %v", line, err)
	}
	// The reader stalls: publish far more than its buffer and the socket
	// buffers hold.
	big := strings.Repeat("x", 1000)
	start := time.Now()
	const n = 200000
	for i := range n {
		f.Publish(Flow{Type: FlowClose, ID: uint64(i), Reason: big})
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("%d publishes took %v with a stalled reader", n, d)
	}
	if _, dropped := f.Counts(); dropped == 0 {
		t.Fatal("nothing dropped for a stalled reader")
	}
	// It reads again: a lost line comes, then events (the marker is
	// published until one copy fits in the reader's buffer).
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
				f.Publish(Flow{Type: FlowClose, ID: 1 << 40})
			}
		}
	}()
	var lost uint64
	for {
		line, err := br.ReadBytes('\n')
		if err != nil {
			t.Fatal(err)
		}
		var fl Flow
		if err := json.Unmarshal(line, &fl); err != nil {
			t.Fatal(err)
		}
		if fl.Type == FlowLost {
			lost += fl.Lost
		}
		if fl.ID == 1<<40 {
			break
		}
	}
	if lost == 0 {
		t.Fatal("no lost line")
	}
	t.Logf("stalled reader lost %d of %d events", lost, n)
}

func readLines(t *testing.T, resp *http.Response) []Flow {
	t.Helper()
	defer resp.Body.Close()
	var out []Flow
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		var fl Flow
		if err := json.Unmarshal(sc.Bytes(), &fl); err != nil {
			t.Fatal(err)
		}
		out = append(out, fl)
	}
	return out
}

func parseQuery(s string) (map[string][]string, error) { return url.ParseQuery(s) }
