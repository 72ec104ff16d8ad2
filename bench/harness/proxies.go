package harness

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/meshless/meshless/conformance"
)

// appPorts are the server ports every reference pair forwards, one proxy service each.
var appPorts = []uint16{IPerfPort, EchoPort, HTTPPort}

// A reference pair's ports: service i listens on localBase+i on the client pod's loopback, and its
// TLS side on tlsBase+i on the server pod's address. All are below the ephemeral port range.
const (
	stunnelLocalBase = 11000
	stunnelTLSBase   = 12000
	haproxyLocalBase = 13000
	haproxyTLSBase   = 14000
)

var loopback = netip.MustParseAddr("127.0.0.1")

// serviceIndex maps a server port to its service in a reference pair.
func serviceIndex(port uint16) int {
	for i, p := range appPorts {
		if p == port {
			return i
		}
	}
	panic(fmt.Sprintf("no proxy service for port %d", port))
}

// proxyTarget is where a client application connects through a reference pair: the local proxy.
func proxyTarget(localBase uint16) func(uint16) netip.AddrPort {
	return func(port uint16) netip.AddrPort {
		return netip.AddrPortFrom(loopback, localBase+uint16(serviceIndex(port)))
	}
}

// startProxy writes a proxy's configuration into the pod's directory, starts the proxy in the pod
// and waits until it listens on every address in listen.
func startProxy(ctx context.Context, pod *conformance.Pod, name, conf string, listen []netip.AddrPort, argv func(path string) []string) (*conformance.Process, error) {
	path := filepath.Join(pod.Dir, name+".conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		return nil, fmt.Errorf("writing %s: %w", path, err)
	}
	proc, err := pod.Start(name, argv(path)...)
	if err != nil {
		return nil, err
	}
	for _, a := range listen {
		if err := waitListening(ctx, pod, a.Port(), proc); err != nil {
			return nil, fmt.Errorf("%s in %s: %w", name, pod, err)
		}
	}
	return proc, nil
}

// stunnelConf returns an stunnel configuration: TLS 1.3 only, the peer's chain verified against
// the cluster's CA, a certificate required of the peer, and the given service sections.
func stunnelConf(certs Certs, client bool, services []string) string {
	var b strings.Builder
	cert, key := certs.ServerCert, certs.ServerKey
	if client {
		cert, key = certs.ClientCert, certs.ClientKey
	}
	// debug = 3 (errors only): like haproxy without a log section, no line per connection.
	fmt.Fprintf(&b, "foreground = yes\npid =\ndebug = 3\n")
	fmt.Fprintf(&b, "cert = %s\nkey = %s\nCAfile = %s\nverifyChain = yes\nrequireCert = yes\n", cert, key, certs.CA)
	fmt.Fprintf(&b, "sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\n")
	if client {
		b.WriteString("client = yes\n")
	}
	for _, s := range services {
		b.WriteString(s)
	}
	return b.String()
}

// startStunnel starts an stunnel4 pair: a client in the client pod accepting on its loopback,
// a server in the server pod accepting on the pod's address and connecting to its loopback.
func startStunnel(ctx context.Context, b *Bench, client, server *conformance.Pod) (*Variant, error) {
	var clientSvcs, serverSvcs []string
	var local, remote []netip.AddrPort
	for i, port := range appPorts {
		l := netip.AddrPortFrom(loopback, stunnelLocalBase+uint16(i))
		r := netip.AddrPortFrom(server.IPv4(), stunnelTLSBase+uint16(i))
		clientSvcs = append(clientSvcs, fmt.Sprintf("[s%d]\naccept = %s\nconnect = %s\n", port, l, r))
		serverSvcs = append(serverSvcs, fmt.Sprintf("[s%d]\naccept = %s\nconnect = %s\n", port, r, netip.AddrPortFrom(loopback, port)))
		local, remote = append(local, l), append(remote, r)
	}
	argv := func(path string) []string { return []string{b.Tools.Stunnel, path} }
	srv, err := startProxy(ctx, server, "stunnel-server", stunnelConf(b.Certs, false, serverSvcs), remote, argv)
	if err != nil {
		return nil, err
	}
	cli, err := startProxy(ctx, client, "stunnel-client", stunnelConf(b.Certs, true, clientSvcs), local, argv)
	if err != nil {
		return nil, err
	}
	return &Variant{
		Name: Stunnel, Client: client, Server: server, Reference: true,
		target:  proxyTarget(stunnelLocalBase),
		proxies: func() []int { return []int{cli.Pid(), srv.Pid()} },
	}, nil
}

// haproxyGlobal is the head of both haproxy configurations: TCP mode, long idle timeouts (wrk's
// connections stay open between requests), and the defaults of a current haproxy otherwise
// (one thread per CPU).
const haproxyGlobal = `global
    maxconn 5000
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
`

// startHAProxy starts an haproxy pair, laid out like the stunnel pair: TLS 1.3 only, the peer
// verified against the cluster's CA, a client certificate required.
func startHAProxy(ctx context.Context, b *Bench, client, server *conformance.Pod) (*Variant, error) {
	tls := func(pem string) string {
		return fmt.Sprintf("ssl crt %s ca-file %s verify required ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3", pem, b.Certs.CA)
	}
	cliConf, srvConf := haproxyGlobal, haproxyGlobal
	var local, remote []netip.AddrPort
	for i, port := range appPorts {
		l := netip.AddrPortFrom(loopback, haproxyLocalBase+uint16(i))
		r := netip.AddrPortFrom(server.IPv4(), haproxyTLSBase+uint16(i))
		cliConf += fmt.Sprintf("listen s%d\n    bind %s\n    server tls %s %s\n", port, l, r, tls(b.Certs.ClientPEM))
		srvConf += fmt.Sprintf("listen s%d\n    bind %s %s\n    server app %s\n", port, r, tls(b.Certs.ServerPEM), netip.AddrPortFrom(loopback, port))
		local, remote = append(local, l), append(remote, r)
	}
	// -db: stay in the foreground, one process (no master-worker).
	argv := func(path string) []string { return []string{b.Tools.HAProxy, "-db", "-f", path} }
	srv, err := startProxy(ctx, server, "haproxy-server", srvConf, remote, argv)
	if err != nil {
		return nil, err
	}
	cli, err := startProxy(ctx, client, "haproxy-client", cliConf, local, argv)
	if err != nil {
		return nil, err
	}
	return &Variant{
		Name: HAProxy, Client: client, Server: server, Reference: true,
		target:  proxyTarget(haproxyLocalBase),
		proxies: func() []int { return []int{cli.Pid(), srv.Pid()} },
	}, nil
}
