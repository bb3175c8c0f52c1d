package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// Server ports inside the server pods.
const (
	fortioPort = 8080
	iperfPort  = 5201
)

// fortioResolution is the histogram resolution given to fortio (seconds):
// 1 µs, so that buckets are 20 µs wide around 0.1-0.2 ms, 50 µs up to
// 0.5 ms and 100 µs up to 1 ms (fortio's default, 1 ms, hides the
// differences this report is about).
const fortioResolution = 1e-6

// Bucket is one histogram bucket of request durations, in seconds.
type Bucket struct {
	Start float64 `json:"start"`
	End   float64 `json:"end"`
	Count int64   `json:"count"`
}

// fortioResult is the part of fortio's JSON output the harness reads.
type fortioResult struct {
	ActualQPS               float64
	ActualDuration          int64 // ns
	NumThreads              int
	RetCodes                map[string]int64
	ErrorsDurationHistogram struct {
		Count int64
	}
	DurationHistogram struct {
		Count       int64
		Min, Max    float64
		Avg         float64
		Percentiles []struct {
			Percentile float64
			Value      float64
		}
		Data []Bucket
	}
	Sizes struct {
		Avg float64
	}
}

// runFortio runs `fortio load` in ns and returns its parsed JSON.
func runFortio(ctx context.Context, niceness int, fortio string, ns *netns.NS, jsonPath string, args ...string) (*fortioResult, error) {
	full := append([]string{"load", "-quiet", "-json", jsonPath, "-r", strconv.FormatFloat(fortioResolution, 'g', -1, 64), "-p", "50,90,99,99.9"}, args...)
	name, full := niced(niceness, fortio, full)
	cmd := ns.Command(ctx, name, full...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("fortio %s: %w: %s", strings.Join(args, " "), err, tailString(string(out), 1500))
	}
	b, err := os.ReadFile(jsonPath)
	if err != nil {
		return nil, fmt.Errorf("fortio result: %w", err)
	}
	var r fortioResult
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("fortio result %s: %w", jsonPath, err)
	}
	return &r, nil
}

// ok counts HTTP 200 answers; everything else is an error.
func (r *fortioResult) ok() (ok, errs int64) {
	for code, n := range r.RetCodes {
		if code == "200" {
			ok += n
		} else {
			errs += n
		}
	}
	return ok, errs
}

// iperfResult is the part of iperf3's JSON output the harness reads.
type iperfResult struct {
	End struct {
		SumReceived struct {
			Bytes         float64 `json:"bytes"`
			BitsPerSecond float64 `json:"bits_per_second"`
			Seconds       float64 `json:"seconds"`
		} `json:"sum_received"`
	} `json:"end"`
	Error string `json:"error"`
}

// runIperf runs an iperf3 client in ns against addr:port for d (after one
// omitted second of slow start) and returns what the receiver counted.
func runIperf(ctx context.Context, niceness int, iperf3 string, ns *netns.NS, host string, port int, d time.Duration) (*iperfResult, error) {
	name, args := niced(niceness, iperf3, []string{"-c", host, "-p", strconv.Itoa(port), "-t", strconv.Itoa(int(d.Seconds())), "-O", "1", "-J"})
	cmd := ns.Command(ctx, name, args...)
	out, err := cmd.Output()
	var r iperfResult
	if jerr := json.Unmarshal(out, &r); jerr != nil {
		return nil, fmt.Errorf("iperf3 to %s:%d: %v: %w: %s", host, port, err, jerr, tailString(string(out), 1500))
	}
	if r.Error != "" {
		return nil, fmt.Errorf("iperf3 to %s:%d: %s", host, port, r.Error)
	}
	if err != nil {
		return nil, fmt.Errorf("iperf3 to %s:%d: %w", host, port, err)
	}
	return &r, nil
}

// startServers runs fortio's echo server and an iperf3 server in pod.
func startServers(niceness int, fortio, iperf3, dir string, pod *netns.Pod) ([]*process, error) {
	f, err := start(niceness, pod.NS, "fortio-"+pod.Name, filepath.Join(dir, "fortio-"+pod.Name+".log"), fortio,
		"server", "-http-port", fmt.Sprintf("0.0.0.0:%d", fortioPort), "-grpc-port", "disabled", "-redirect-port", "disabled", "-loglevel", "Warning")
	if err != nil {
		return nil, err
	}
	i, err := start(niceness, pod.NS, "iperf3-"+pod.Name, filepath.Join(dir, "iperf3-"+pod.Name+".log"), iperf3, "-s", "-p", strconv.Itoa(iperfPort))
	if err != nil {
		f.stop(time.Second)
		return nil, err
	}
	return []*process{f, i}, nil
}

func tailString(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
