package cniconf

import (
	"context"
	"time"
)

// DefaultInterval is how often Watch looks at the conf dir.
const DefaultInterval = time.Second

// Watch keeps our entry chained into the primary network configuration of dir until ctx
// is done: it runs Install at once and then every interval (DefaultInterval if zero).
//
// It polls rather than using inotify: a poll is one ReadDir and one small file read, it
// needs no special handling of atomic renames, of the dir appearing late or being
// re-created, or of hostPath mounts, and a missed event cannot leave the node unchained.
//
// Loops are impossible by construction: Install writes only when our entry is missing or
// differs, so after our own write the next poll finds it in place and does nothing. A
// primary CNI that rewrites its file (Calico, Flannel, Cilium do) is re-chained at the
// next poll. An empty (or missing) dir is waited on; a malformed file is left untouched.
//
// report (may be nil) is called for every write, and for an error once it has persisted
// for two polls in a row (so a file read while its writer is half-way through is not
// reported, and a file that stays malformed, or a dir that stays empty, is reported once,
// not every second). Watch returns ctx.Err().
func Watch(ctx context.Context, dir string, entry Entry, interval time.Duration, report func(Result, error)) error {
	if interval <= 0 {
		interval = DefaultInterval
	}
	if report == nil {
		report = func(Result, error) {}
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	prevErr, reported := "", ""
	for {
		res, err := Install(dir, entry)
		switch {
		case err != nil:
			// An error is reported once it has been seen on two polls in a row: a primary
			// CNI writing its file in place can be read half-written, which the next poll
			// sorts out by itself.
			if e := err.Error(); e == prevErr && e != reported {
				report(res, err)
				reported = e
			}
			prevErr = err.Error()
		default:
			prevErr, reported = "", ""
			if res.Action != Unchanged {
				report(res, nil)
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}
