//go:build !linux && !darwin

package relay

import "syscall"

// waitReset does not watch on this platform: the bounds still apply.
func waitReset(syscall.RawConn) error { return nil }
