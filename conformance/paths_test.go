package conformance_test

// Helpers of the scenarios about the paths a pod's traffic can take (service, egress, exclude,
// foreign, outsider): waiting for the records that daemons and test servers write once a
// connection is over, and telling a refusal apart from a success or a hang.

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshless/meshless/conformance"
)

// Namespace prefixes of these scenarios.
const (
	pathsNodePrefix = "mlpn-"
	pathsPodPrefix  = "mlpp-"
)

// newPathsCluster creates a cluster for these scenarios with the given service accounts.
func newPathsCluster(t *testing.T, workloads map[string]string) *conformance.Cluster {
	t.Helper()
	c, err := conformance.NewCluster(t, conformance.ClusterConfig{
		Bins:       binaries(t),
		NodePrefix: pathsNodePrefix,
		PodPrefix:  pathsPodPrefix,
		Workloads:  workloads,
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// waitConnRecords waits until the node's daemon has logged at least n "connection" records
// matching kv (see conformance.Log.Find) and returns all of them. Records are written when a
// connection ends, which may be just after the client has its answer.
func waitConnRecords(t *testing.T, node *conformance.Node, n int, kv ...any) []conformance.Record {
	t.Helper()
	kv = append([]any{"msg", "connection"}, kv...)
	deadline := time.Now().Add(10 * time.Second)
	for {
		l, err := node.Logs()
		if err != nil {
			t.Fatal(err)
		}
		found := l.Find(kv...)
		if len(found) >= n {
			return found
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s logged %d connection records %v, want %d", node.Name, len(found), kv, n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// requireNoConnRecord fails the test if a node's daemon logged a connection that match accepts.
func requireNoConnRecord(t *testing.T, node *conformance.Node, what string, match func(conformance.Record) bool) {
	t.Helper()
	l, err := node.Logs()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range l.Find("msg", "connection") {
		if match(r) {
			t.Errorf("%s: %s logged %v, want no daemon record", what, node.Name, r)
		}
	}
}

// recordHost returns the address of a "host:port" log value (invalid when it is not one).
func recordHost(r conformance.Record, key string) netip.AddrPort {
	ap, _ := netip.ParseAddrPort(r.String(key))
	return ap
}

// servedFrom returns the connections a testapp server logged from the address from.
func servedFrom(t *testing.T, srv *conformance.Process, from netip.Addr) []conformance.ServerConn {
	t.Helper()
	conns, err := conformance.ServerConns(srv)
	if err != nil {
		t.Fatal(err)
	}
	var out []conformance.ServerConn
	for _, c := range conns {
		if ap, err := netip.ParseAddrPort(c.Peer); err == nil && ap.Addr() == from {
			out = append(out, c)
		}
	}
	return out
}

// waitServed waits until the servers together logged n connections from the address from (a
// server logs a connection after closing it, possibly after its client finished) and returns
// each server's share.
func waitServed(t *testing.T, from netip.Addr, n int, srvs ...*conformance.Process) [][]conformance.ServerConn {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var shares [][]conformance.ServerConn
		total := 0
		for _, s := range srvs {
			got := servedFrom(t, s, from)
			shares, total = append(shares, got), total+len(got)
		}
		if total >= n || time.Now().After(deadline) {
			return shares
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// requireRefused runs one exchange that must be refused: the client gets a reset (or a refused
// connect) and no byte of an answer, promptly.
func requireRefused(t *testing.T, from interface {
	Client(context.Context, netip.AddrPort, string, conformance.ClientOptions) (conformance.ClientResult, error)
}, target netip.AddrPort, marker string) conformance.ClientResult {
	t.Helper()
	res, err := from.Client(testCtx(t), target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 16 << 10, Marker: marker, Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if res.Error == "" || res.Received > 0 || !slices.Contains([]string{conformance.KindReset, conformance.KindRefused}, res.ErrorKind) {
		t.Errorf("to %s: %+v, want a reset or refused connection with nothing received", target, res)
	}
	return res
}

// containsAny reports whether s mentions one of words, ignoring case.
func containsAny(s string, words ...string) bool {
	s = strings.ToLower(s)
	return slices.ContainsFunc(words, func(w string) bool { return strings.Contains(s, strings.ToLower(w)) })
}
