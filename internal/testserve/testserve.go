// Package testserve runs an HTTP server for the length of a test, as meshlessd runs its
// enrollment API: net/http's server on a listener of the caller's (enroll.Listen's socket).
package testserve

import (
	"net"
	"net/http"
	"testing"
	"time"
)

// Serve serves h on l until the test ends; then the server is closed and has stopped.
func Serve(t testing.TB, l net.Listener, h http.Handler) {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(l)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
}
