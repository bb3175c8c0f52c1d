//go:build !race

package ztunnel

const raceDetector = false
