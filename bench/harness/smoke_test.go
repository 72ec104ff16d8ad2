package harness_test

// A smoke test of the benchmark's harness, quick enough for CI: every variant carries 1 MiB
// byte for byte and one HTTP request, the wire between the pods is TLS for meshless and
// the references (and clear for plaintext, which shows the capture sees the traffic), and each
// workload runs once, briefly, with its output parsed, as does the measurement of meshless alone
// (on a few pods and connections). It asserts what arrived, never how fast.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshless/meshless/bench/harness"
	"github.com/meshless/meshless/conformance"
)

const marker = "MESHLESS-BENCH-SMOKE-MARKER"

func setup(t *testing.T) (context.Context, *harness.Bench) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, iptables, tcpdump)")
	}
	tools, err := harness.FindTools(os.Getenv("MESHLESS_HEY"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	bins, err := conformance.BuildBinaries(ctx, filepath.Join(t.TempDir(), "bin"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := harness.Setup(ctx, t, harness.Config{Bins: bins, Tools: tools, NodePrefix: "mlbtn-", PodPrefix: "mlbtp-"})
	if err != nil {
		t.Fatal(err)
	}
	return ctx, b
}

func TestSmoke(t *testing.T) {
	ctx, b := setup(t)
	var names []string
	for _, v := range b.Variants {
		names = append(names, v.Name)
	}
	if got := strings.Join(names, " "); got != "plaintext meshless stunnel4 haproxy" {
		t.Fatalf("variants %q", got)
	}
	for _, v := range b.Variants {
		t.Run(v.Name+"/wire", func(t *testing.T) { checkWire(ctx, t, b, v) })
	}
	for _, v := range b.Variants {
		t.Run(v.Name+"/workloads", func(t *testing.T) { checkWorkloads(ctx, t, b, v) })
	}
	t.Run("meshless-alone", func(t *testing.T) {
		d, err := harness.MeasureDaemon(ctx, b.Cluster, 2, 5, t.Logf)
		if err != nil {
			t.Fatal(err)
		}
		if d.RSSStartKiB <= 0 || d.RSSIdleKiB <= 0 || d.RSSConnsKiB <= 0 || d.Pods != 2 || d.Conns != 5 {
			t.Errorf("daemon figures: %+v", d)
		}
		if len(d.AddMesh) != 2 || len(d.AddPlain) != 2 {
			t.Errorf("CNI ADD times of %d mesh and %d plain pods, want 2 and 2", len(d.AddMesh), len(d.AddPlain))
		}
	})
}

// checkWire passes 1 MiB and one HTTP request through the variant while capturing the bridge.
// The server sends the 1 MiB and closes (ModeSend): an echo would end with the client's
// half-close, which stunnel4 does not pass on reliably (on the client's close_notify it may close
// both directions while the echo is still coming back), and stunnel's half-close is not what
// this test is about; meshless's is covered by the conformance suite.
func checkWire(ctx context.Context, t *testing.T, b *harness.Bench, v *harness.Variant) {
	client, server := v.Client.IPv4(), v.Server.IPv4()
	capture, err := b.Node.StartCapture(ctx, "smoke-"+v.Name, fmt.Sprintf("tcp and host %s and host %s", client, server))
	if err != nil {
		t.Fatal(err)
	}
	res, err := conformance.RunClient(ctx, b.Cluster.Config.Bins, v.Client.Netns, v.Target(harness.EchoPort), conformance.ModeSend,
		conformance.ClientOptions{Bytes: 1 << 20, Marker: marker})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Match || res.Received != 1<<20 {
		t.Errorf("1 MiB via %s: %+v", v.Name, res)
	}
	body := httpGet(ctx, t, v)
	if !bytes.Equal(body, harness.HTTPBody) {
		t.Errorf("GET %s returned %d bytes, not the %d-byte body", harness.HTTPURL(v), len(body), harness.HTTPBodySize)
	}
	trace, err := capture.StopAndRead()
	if err != nil {
		t.Fatal(err)
	}
	flows := conformance.WithPayload(trace.Between(client, server))
	if len(flows) < 4 {
		t.Fatalf("%d flows with payload between %s and %s, want the echo's and the request's, both ways", len(flows), client, server)
	}
	clear := trace.FlowsWithClear([]byte(marker))
	if v.Name == harness.Plaintext {
		if len(clear) == 0 {
			t.Error("plaintext: the capture did not see the marker in clear: it does not see the traffic")
		}
		return
	}
	if len(clear) > 0 {
		t.Errorf("the marker crossed the wire in clear: %v", clear)
	}
	if hits := trace.FlowsWithClear(harness.HTTPBody[:64]); len(hits) > 0 {
		t.Errorf("the HTTP body crossed the wire in clear: %v", hits)
	}
	for _, f := range flows {
		st, err := f.CheckTLS()
		if err != nil {
			t.Errorf("not TLS: %v", err)
			continue
		}
		if st.Types[conformance.TLSApplicationData] == 0 {
			t.Errorf("%s: no application data records (%+v)", f, st)
		}
		if f.Src.Addr() == server {
			if v, err := serverHelloVersion(f.Data); err != nil || v != 0x0304 {
				t.Errorf("%s: ServerHello does not select TLS 1.3: version %#04x, %v", f, v, err)
			}
		}
	}
}

// serverHelloVersion returns the TLS version a server's first flight selects: the
// supported_versions extension of its ServerHello (TLS 1.3), else the legacy version field.
func serverHelloVersion(data []byte) (uint16, error) {
	u16 := func(b []byte) uint16 { return uint16(b[0])<<8 | uint16(b[1]) }
	// Record header (5), handshake header (4), legacy_version (2), random (32).
	const fixed = 5 + 4 + 2 + 32
	if len(data) < fixed+1 || data[0] != conformance.TLSHandshake || data[5] != 2 {
		return 0, fmt.Errorf("the stream does not start with a ServerHello (% x)", data[:min(len(data), 8)])
	}
	legacy := u16(data[9:])
	rest := data[fixed:]
	sid := int(rest[0])
	// session id, cipher suite (2), compression (1), extensions length (2).
	if len(rest) < 1+sid+5 {
		return 0, errors.New("short ServerHello")
	}
	ext := rest[1+sid+3:]
	n := int(u16(ext))
	if len(ext) < 2+n {
		return 0, errors.New("ServerHello extensions run past the record")
	}
	for ext = ext[2 : 2+n]; len(ext) >= 4; {
		typ, l := u16(ext), int(u16(ext[2:]))
		if len(ext) < 4+l {
			return 0, errors.New("truncated ServerHello extension")
		}
		if typ == 0x002b && l == 2 {
			return u16(ext[4:]), nil
		}
		ext = ext[4+l:]
	}
	return legacy, nil
}

// httpGet fetches nginx's body through the variant, from inside its client pod.
func httpGet(ctx context.Context, t *testing.T, v *harness.Variant) []byte {
	t.Helper()
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return conformance.DialIn(ctx, v.Client.NetnsPath(), network, addr)
		},
		DisableKeepAlives: true,
	}, Timeout: 30 * time.Second}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, harness.HTTPURL(v), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", req.URL, resp.Status)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return body
}

// checkWorkloads runs each workload once, briefly, and checks that its output was understood
// and that the proxies' CPU time can be read.
func checkWorkloads(ctx context.Context, t *testing.T, b *harness.Bench, v *harness.Variant) {
	pids := v.ProxyPIDs()
	if (len(pids) == 0) != (v.Name == harness.Plaintext) {
		t.Errorf("proxy processes %v", pids)
	}
	if _, err := harness.CPUSeconds(pids); err != nil {
		t.Error(err)
	}
	ip, err := harness.IPerf(ctx, b, v, 2, time.Second)
	if err != nil {
		t.Error(err)
	} else if ip.Bytes <= 0 || ip.BitsPerSecond <= 0 {
		t.Errorf("iperf3: %+v", ip)
	}
	rtts, err := harness.RequestResponse(ctx, v, 1024, 2, 20)
	if err != nil {
		t.Error(err)
	} else if len(rtts) != 20 {
		t.Errorf("request/response returned %d round trips, want 20", len(rtts))
	}
	wrk, err := harness.Wrk(ctx, b, v, time.Second, 2, 1)
	if err != nil {
		t.Error(err)
	} else if wrk.Requests <= 0 {
		t.Errorf("wrk: %+v", wrk)
	}
	hey, err := harness.Hey(ctx, b, v, time.Second, 2)
	if err != nil {
		t.Error(err)
	} else if hey.OK <= 0 {
		t.Errorf("hey: %+v", hey)
	}
	// Behind a reference pair the application connects to the local proxy on its loopback;
	// otherwise to the server pod itself.
	if want := v.Target(harness.EchoPort); v.Reference != (want.Addr() == netip.MustParseAddr("127.0.0.1")) {
		t.Errorf("%s targets %s", v.Name, want)
	}
}
