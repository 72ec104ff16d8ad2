// Package benchcpu reports the CPU time (user and system) a benchmark's process uses per
// operation. With every end of an exchange in the one process (client, proxies, server), it is
// the cost of all of them together, which wall time on a busy machine hides.
package benchcpu

import (
	"syscall"
	"testing"
	"time"
)

// Now returns the CPU time the process has used so far.
func Now(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// Report adds the CPU time used since start, per operation, as the metric cpu-ns/op.
func Report(b *testing.B, start time.Duration) {
	b.ReportMetric(float64(Now(b)-start)/float64(b.N), "cpu-ns/op")
}
