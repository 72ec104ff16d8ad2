package conformance_test

// Benchmarks of what meshless adds to a pod's connections, against the same pods without it:
//
//	go test -run '^$' -bench . -benchtime 3000x ./conformance/
//
// Each sub-benchmark builds one node with two pods, either both chained with meshless-cni
// (mTLS between them) or both plain. MESHLESS_BENCH_DAEMON_ENV adds space-separated KEY=VALUE
// pairs to meshlessd's environment (GOMAXPROCS=1, GODEBUG=..., to compare runtime settings), and
// MESHLESS_BENCH_DAEMON_ARGS adds flags to `meshlessd run` (--pq=false).

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshless/meshless/conformance"
	"github.com/meshless/meshless/conformance/internal/testproto"
)

const benchPort = 8080

func benchPods(b *testing.B, mesh bool) (client *conformance.Pod, target netip.AddrPort) {
	b.Helper()
	needRoot(b)
	ctx := testCtx(b)
	c, err := conformance.NewCluster(b, conformance.ClusterConfig{
		Bins: binaries(b), NodePrefix: "mlbn-", PodPrefix: "mlbp-",
	})
	if err != nil {
		b.Fatal(err)
	}
	node, err := c.AddNode(ctx, conformance.NodeConfig{
		DaemonEnv:  strings.Fields(os.Getenv("MESHLESS_BENCH_DAEMON_ENV")),
		DaemonArgs: strings.Fields(os.Getenv("MESHLESS_BENCH_DAEMON_ARGS")),
	})
	if err != nil {
		b.Fatal(err)
	}
	add := node.AddPlainPod
	if mesh {
		add = node.AddPod
	}
	client, err = add(ctx, conformance.PodConfig{Namespace: "bench", Name: "client"})
	if err != nil {
		b.Fatal(err)
	}
	server, err := add(ctx, conformance.PodConfig{Namespace: "bench", Name: "server"})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := server.StartServer(ctx, benchPort); err != nil {
		b.Fatal(err)
	}
	return client, netip.AddrPortFrom(server.IPv4(), benchPort)
}

func variants(b *testing.B, run func(b *testing.B, client *conformance.Pod, target netip.AddrPort)) {
	for _, mesh := range []bool{false, true} {
		name := "plaintext"
		if mesh {
			name = "meshless"
		}
		b.Run(name, func(b *testing.B) {
			client, target := benchPods(b, mesh)
			run(b, client, target)
		})
	}
}

// BenchmarkRequestResponse is a 64-byte ping-pong on one warm connection: the latency that
// meshless adds to every request of a keep-alive client.
func BenchmarkRequestResponse(b *testing.B) {
	variants(b, func(b *testing.B, client *conformance.Pod, target netip.AddrPort) {
		conn, err := client.Dial(testCtx(b), "tcp", target.String())
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		if _, err := fmt.Fprintf(conn, "%s\n", testproto.CmdEcho); err != nil {
			b.Fatal(err)
		}
		msg, buf := make([]byte, 64), make([]byte, 64)
		var lat []time.Duration
		for b.Loop() {
			start := time.Now()
			if _, err := conn.Write(msg); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(conn, buf); err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(start))
		}
		reportPercentiles(b, lat)
	})
}

// reportPercentiles adds the median and the 99th percentile of lat to the benchmark's line: on a
// shared machine the mean follows the worst stalls, the median does not.
func reportPercentiles(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds()), "p50-ns")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds()), "p99-ns")
}

// BenchmarkNewConnection opens a connection per request, as a client without keep-alive does:
// with meshless each one is a full mTLS handshake or a resumed session.
func BenchmarkNewConnection(b *testing.B) {
	variants(b, func(b *testing.B, client *conformance.Pod, target netip.AddrPort) {
		ctx := testCtx(b)
		var lat []time.Duration
		for b.Loop() {
			start := time.Now()
			conn, err := client.Dial(ctx, "tcp", target.String())
			if err != nil {
				b.Fatal(err)
			}
			if _, err := fmt.Fprintf(conn, "%s\n", testproto.CmdPeer); err != nil {
				b.Fatal(err)
			}
			if _, err := bufio.NewReader(conn).ReadString('\n'); err != nil {
				b.Fatal(err)
			}
			conn.(*net.TCPConn).Close()
			lat = append(lat, time.Since(start))
		}
		reportPercentiles(b, lat)
	})
}
