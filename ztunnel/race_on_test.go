//go:build race

package ztunnel

// raceDetector: tests that measure throughput do less under the race
// detector, which slows every access.
const raceDetector = true
