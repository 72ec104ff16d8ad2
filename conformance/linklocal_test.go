package conformance_test

// Pods with IPv4 addresses only still get IPv6 link-local addresses on their interface, and on a
// shared bridge (the bridge plugin, flannel) they reach each other over them. TCP over IPv6 must
// not be a way around the mesh for such pods: it is refused both ways.

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshless/meshless/conformance"
)

// linkLocal returns the pod's IPv6 link-local address on its CNI interface, with the zone, once
// duplicate address detection has finished with it (a tentative address cannot be used).
func linkLocal(t *testing.T, p *conformance.Pod) netip.Addr {
	t.Helper()
	ifname := p.RuntimeConf().IfName
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, err := p.Exec(testCtx(t), "ip", "-6", "-o", "addr", "show", "dev", ifname, "scope", "link", "-tentative")
		if err != nil {
			t.Fatalf("addresses of %s: %v: %s", p, err, out)
		}
		for f := range strings.FieldsSeq(string(out)) {
			if pfx, err := netip.ParsePrefix(f); err == nil && pfx.Addr().IsLinkLocalUnicast() {
				return pfx.Addr().WithZone(ifname)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s has no usable IPv6 link-local address on %s: %s", p, ifname, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// linkLocalServer accepts connections in a pod on every address over IPv6 and answers each with
// what it read, up to a newline.
type linkLocalServer struct {
	port     uint16
	accepted chan netip.AddrPort
}

func listenLinkLocal(t *testing.T, p *conformance.Pod) *linkLocalServer {
	t.Helper()
	ln, err := p.Listen("tcp6", "[::]:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &linkLocalServer{port: uint16(ln.Addr().(*net.TCPAddr).Port), accepted: make(chan netip.AddrPort, 16)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return // closed at teardown
			}
			select {
			case s.accepted <- c.RemoteAddr().(*net.TCPAddr).AddrPort():
			default:
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				buf := make([]byte, 64)
				n, _ := c.Read(buf)
				_, _ = c.Write(buf[:n])
			}()
		}
	}()
	return s
}

// linkLocalExchange dials target from the pod over IPv6, sends a line and returns the answer.
func linkLocalExchange(ctx context.Context, from *conformance.Pod, target netip.AddrPort) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := from.Dial(ctx, "tcp6", target.String())
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, coreMarker+"\n"); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	if len(b) == 0 && err == nil {
		err = io.EOF
	}
	return string(b), err
}

func TestIPv6LinkLocal(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	c, err := conformance.NewCluster(t, conformance.ClusterConfig{
		Bins:       binaries(t),
		Mode:       conformance.ModePermissive,
		NodePrefix: "mlllnode-",
		PodPrefix:  "mlllpod-",
		Workloads:  map[string]string{"ll/client": "client-sa", "ll/server": "server-sa"},
	})
	if err != nil {
		t.Fatal(err)
	}
	node, err := c.AddNode(ctx, conformance.NodeConfig{})
	if err != nil {
		t.Fatal(err)
	}
	client, err := node.AddPod(ctx, conformance.PodConfig{Namespace: "ll", Name: "client"})
	if err != nil {
		t.Fatal(err)
	}
	server, err := node.AddPod(ctx, conformance.PodConfig{Namespace: "ll", Name: "server"})
	if err != nil {
		t.Fatal(err)
	}
	plainA, err := node.AddPlainPod(ctx, conformance.PodConfig{Namespace: "ll", Name: "plain-a"})
	if err != nil {
		t.Fatal(err)
	}
	plainB, err := node.AddPlainPod(ctx, conformance.PodConfig{Namespace: "ll", Name: "plain-b"})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []*conformance.Pod{client, server, plainA, plainB} {
		if p.IPv6().IsValid() {
			t.Fatalf("%s has the IPv6 address %s from CNI; this test is about pods without one", p, p.IPv6())
		}
	}

	serverSrv := listenLinkLocal(t, server)
	plainSrv := listenLinkLocal(t, plainB)
	serverLL := netip.AddrPortFrom(linkLocal(t, server), serverSrv.port)
	plainLL := netip.AddrPortFrom(linkLocal(t, plainB), plainSrv.port)

	// The control: outside the mesh, link-local TCP works on this bridge, so a refusal below is
	// the capture's doing.
	if got, err := linkLocalExchange(ctx, plainA, plainLL); err != nil || got != coreMarker+"\n" {
		t.Fatalf("plain pod to plain pod over %s: answer %q, %v", plainLL, got, err)
	}
	<-plainSrv.accepted

	refused := []struct {
		name     string
		from     *conformance.Pod
		target   netip.AddrPort
		accepted chan netip.AddrPort
	}{
		{"mesh pod to mesh pod", client, serverLL, serverSrv.accepted},
		{"plain pod to mesh pod", plainA, serverLL, serverSrv.accepted},
		{"mesh pod to plain pod", client, plainLL, plainSrv.accepted},
	}
	for _, r := range refused {
		// Refused at once, as a closed port is: an app must not wait out its connect timeout.
		got, err := linkLocalExchange(ctx, r.from, r.target)
		if !errors.Is(err, syscall.ECONNREFUSED) || got != "" {
			t.Errorf("%s over %s: answer %q, error %v; want the connection refused", r.name, r.target, got, err)
		}
		select {
		case from := <-r.accepted:
			t.Errorf("%s over %s: the server accepted a connection from %s", r.name, r.target, from)
		default:
		}
	}
}
