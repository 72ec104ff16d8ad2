package conformance_test

// Every pod gets an IPv6 link-local address on its interface, whether or not CNI gave it an IPv6
// address, and on a shared bridge (the bridge plugin, flannel) pods reach each other over them.
// TCP over them must not be a way around the mesh: a pod without an IPv6 address refuses it both
// ways; a dual-stack pod refuses its own and captures the rest like any other.

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshless/meshless/conformance"
)

// linkLocal returns the pod's link-local address, waiting at most 10 s for it to become usable.
func linkLocal(t *testing.T, p *conformance.Pod) netip.Addr {
	t.Helper()
	ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
	defer cancel()
	a, err := p.LinkLocal(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// linkLocalServer accepts connections in a pod on every address, IPv6 and IPv4, and echoes each
// one's first read (up to 64 bytes).
type linkLocalServer struct {
	port     uint16
	accepted chan netip.AddrPort
}

func listenLinkLocal(t *testing.T, p *conformance.Pod) *linkLocalServer {
	t.Helper()
	ln, err := p.Listen("tcp", "[::]:0")
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

// linkLocalExchange dials target from the pod, sends a line and returns the answer.
func linkLocalExchange(ctx context.Context, from *conformance.Pod, target netip.AddrPort, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := from.Dial(ctx, "tcp", target.String())
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, coreMarker+"\n"); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	if len(b) == 0 && err == nil {
		err = io.EOF
	}
	return string(b), err
}

// linkLocalAttempt is a connection over IPv6 link-local addresses that must not reach its server.
type linkLocalAttempt struct {
	name     string
	from     *conformance.Pod
	target   netip.AddrPort
	accepted chan netip.AddrPort
}

// linkLocalNode starts a cluster of one node for the tests of this file, dual-stack if ipv6.
func linkLocalNode(t *testing.T, ipv6 bool, mode string) *conformance.Node {
	t.Helper()
	c, err := conformance.NewCluster(t, conformance.ClusterConfig{
		Bins:       binaries(t),
		IPv6:       ipv6,
		Mode:       mode,
		NodePrefix: "mlllnode-",
		PodPrefix:  "mlllpod-",
		Workloads: map[string]string{
			"ll/client": "client-sa", "ll/server": "server-sa", "ll/old": "old-sa", "ll/new": "new-sa",
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	node, err := c.AddNode(testCtx(t), conformance.NodeConfig{})
	if err != nil {
		t.Fatal(err)
	}
	return node
}

// setupLinkLocal starts a node with two mesh pods and two plain pods, servers on every IPv6
// address in the mesh pod "server" and the plain pod "plain-b", and checks that link-local TCP
// works between the plain pods, so that what fails between the others is the capture's doing.
// It returns the attempts between mesh pods, and between mesh and plain pods.
func setupLinkLocal(t *testing.T, ipv6 bool, mode string) []linkLocalAttempt {
	t.Helper()
	ctx := testCtx(t)
	node := linkLocalNode(t, ipv6, mode)
	var pods []*conformance.Pod
	for _, name := range []string{"client", "server", "plain-a", "plain-b"} {
		add := node.AddPod
		if strings.HasPrefix(name, "plain") {
			add = node.AddPlainPod
		}
		p, err := add(ctx, conformance.PodConfig{Namespace: "ll", Name: name})
		if err != nil {
			t.Fatal(err)
		}
		if p.IPv6().IsValid() != ipv6 {
			t.Fatalf("%s has IPv6 address %v from CNI, want one: %v", p, p.IPv6(), ipv6)
		}
		pods = append(pods, p)
	}
	client, server, plainA, plainB := pods[0], pods[1], pods[2], pods[3]

	serverSrv := listenLinkLocal(t, server)
	plainSrv := listenLinkLocal(t, plainB)
	serverLL := netip.AddrPortFrom(linkLocal(t, server), serverSrv.port)
	plainLL := netip.AddrPortFrom(linkLocal(t, plainB), plainSrv.port)
	if got, err := linkLocalExchange(ctx, plainA, plainLL, 5*time.Second); err != nil || got != coreMarker+"\n" {
		t.Fatalf("plain pod to plain pod over %s: answer %q, %v", plainLL, got, err)
	}
	<-plainSrv.accepted

	return []linkLocalAttempt{
		{"mesh pod to mesh pod", client, serverLL, serverSrv.accepted},
		{"plain pod to mesh pod", plainA, serverLL, serverSrv.accepted},
		{"mesh pod to plain pod", client, plainLL, plainSrv.accepted},
	}
}

// requireNotAccepted fails the test if the attempt's server accepted a connection.
func (a linkLocalAttempt) requireNotAccepted(t *testing.T) {
	t.Helper()
	select {
	case from := <-a.accepted:
		t.Errorf("%s over %s: the server accepted a connection from %s", a.name, a.target, from)
	default:
	}
}

func TestIPv6LinkLocal(t *testing.T) {
	needRoot(t)
	// Permissive: even where plaintext from outside the mesh is let in, a pod's IPv6 is not.
	t.Run("IPv4-only pods", func(t *testing.T) {
		for _, a := range setupLinkLocal(t, false, conformance.ModePermissive) {
			// Refused at once, as a closed port is: an app must not wait out its connect timeout.
			got, err := linkLocalExchange(testCtx(t), a.from, a.target, 5*time.Second)
			if !errors.Is(err, syscall.ECONNREFUSED) || got != "" {
				t.Errorf("%s over %s: answer %q, error %v; want the connection refused", a.name, a.target, got, err)
			}
			a.requireNotAccepted(t)
		}
	})
	// Dual-stack pods' IPv6 is captured like their IPv4, except their own connections to a
	// link-local address, which cannot be (their redirect to ::1, bound to the pod's interface,
	// has no route): those are refused at once too. A connection to their link-local address
	// goes to the daemon, where strict refuses plaintext.
	t.Run("dual-stack pods", func(t *testing.T) {
		for _, a := range setupLinkLocal(t, true, conformance.ModeStrict) {
			got, err := linkLocalExchange(testCtx(t), a.from, a.target, 2*time.Second)
			if a.from.Mesh {
				if !errors.Is(err, syscall.ECONNREFUSED) || got != "" {
					t.Errorf("%s over %s: answer %q, error %v; want the connection refused", a.name, a.target, got, err)
				}
			} else if err == nil || got != "" {
				t.Errorf("%s over %s: answer %q, error %v; want no answer", a.name, a.target, got, err)
			}
			a.requireNotAccepted(t)
		}
	})
}

// TestIPv6RefusalMissingIsRepaired plays an upgrade: a pod captured by a meshless-cni older than
// the IPv6 refusal has no IPv6 chains, and its link-local address is a way around the mesh. When
// the daemon starts, it runs the plugin again for that pod, and only it, which closes the way
// and leaves the pod's mesh traffic as it was; where it cannot (no plugin where it looks), it
// names the pod in a warning.
func TestIPv6RefusalMissingIsRepaired(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	node := linkLocalNode(t, false, conformance.ModeStrict)
	var pods []*conformance.Pod
	for _, name := range []string{"old", "new", "plain"} {
		add := node.AddPod
		if name == "plain" {
			add = node.AddPlainPod
		}
		p, err := add(ctx, conformance.PodConfig{Namespace: "ll", Name: name})
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, p)
	}
	old, fresh, plain := pods[0], pods[1], pods[2]
	plainSrv := listenLinkLocal(t, plain)
	plainLL := netip.AddrPortFrom(linkLocal(t, plain), plainSrv.port)
	removeIPv6RefusalByHand(t, old)
	if got, err := linkLocalExchange(ctx, old, plainLL, 5*time.Second); err != nil || got != coreMarker+"\n" {
		t.Fatalf("%s to %s over %s without the refusal: answer %q, %v; want the plaintext way around that the upgrade closes", old, plain, plainLL, got, err)
	}

	// No plugin where the daemon looks: the pod stays as it is, named in a warning.
	daemonArgs := node.Config.DaemonArgs
	node.Config.DaemonArgs = append(slices.Clip(daemonArgs), "--cni-bin-dir", t.TempDir())
	since := restartForRefusal(t, node, "2", "1", "0")
	l, err := node.Logs()
	if err != nil {
		t.Fatal(err)
	}
	warned := l.Since(since).Find("msg", "pod's IPv6 link-local address is not captured: recreate the pod")
	if len(warned) != 1 || warned[0].String("pod") != old.Name || warned[0].String("namespace") != old.Namespace {
		t.Errorf("warnings %v, want one naming %s", warned, old)
	}

	node.Config.DaemonArgs = daemonArgs
	since = restartForRefusal(t, node, "2", "1", "1")
	l, err = node.Logs()
	if err != nil {
		t.Fatal(err)
	}
	repaired := l.Since(since).Find("msg", "pod's IPv6 link-local address refused now")
	if len(repaired) != 1 || repaired[0].String("pod") != old.Name || repaired[0].String("namespace") != old.Namespace {
		t.Errorf("repairs %v, want one naming %s", repaired, old)
	}
	got, err := linkLocalExchange(ctx, old, plainLL, 5*time.Second)
	if !errors.Is(err, syscall.ECONNREFUSED) || got != "" {
		t.Errorf("%s to %s over %s after the repair: answer %q, error %v; want the connection refused", old, plain, plainLL, got, err)
	}
	// The pod's enrollment and capture were kept: its mesh traffic goes on.
	freshSrv := listenLinkLocal(t, fresh)
	target := netip.AddrPortFrom(fresh.IPv4(), freshSrv.port)
	if got, err := linkLocalExchange(ctx, old, target, 5*time.Second); err != nil || got != coreMarker+"\n" {
		t.Errorf("%s to %s over %s after the repair: answer %q, %v", old, fresh, target, got, err)
	}
}

// restartForRefusal restarts the node's daemon and checks its summary of the IPv6 refusal: how
// many pods it checked, found without the refusal and repaired. It returns where in the log the
// restart began.
func restartForRefusal(t *testing.T, node *conformance.Node, pods, unrefused, repaired string) int {
	t.Helper()
	since := logLen(t, node)
	if err := node.Restart(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	done := waitRecords(t, node, since, 1, "msg", "IPv6 refusal checked")[0]
	if done.String("pods") != pods || done.String("unrefused") != unrefused || done.String("repaired") != repaired {
		t.Errorf("summary %v, want %s pods checked, %s unrefused and %s repaired", done, pods, unrefused, repaired)
	}
	return since
}

// removeIPv6RefusalByHand takes the IPv6 chains out of a pod without an IPv6 address, with
// whichever iptables backend holds them, as an earlier meshless-cni left such a pod.
func removeIPv6RefusalByHand(t *testing.T, p *conformance.Pod) {
	t.Helper()
	ctx := testCtx(t)
	for _, backend := range []string{"nft", "legacy"} {
		tool := "ip6tables-" + backend
		out, err := p.Exec(ctx, tool+"-save", "-t", "filter")
		if err != nil || !strings.Contains(string(out), "MESHLESS_OUTPUT") {
			continue
		}
		script := strings.Join([]string{
			tool + " -t filter -D OUTPUT -p tcp -j MESHLESS_OUTPUT",
			tool + " -t filter -D INPUT -p tcp -j MESHLESS_INBOUND",
			tool + " -t filter -F MESHLESS_OUTPUT", tool + " -t filter -X MESHLESS_OUTPUT",
			tool + " -t filter -F MESHLESS_INBOUND", tool + " -t filter -X MESHLESS_INBOUND",
		}, " && ")
		if out, err := p.Exec(ctx, "sh", "-c", script); err != nil {
			t.Fatalf("remove the IPv6 chains of %s: %v: %s", p, err, out)
		}
		return
	}
	t.Fatalf("%s has no IPv6 refusal chains with either iptables backend", p)
}
