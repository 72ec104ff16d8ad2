package conformance

import (
	"context"
	"fmt"
	"net"

	"github.com/containernetworking/plugins/pkg/ns"
)

// ListenIn listens inside the network namespace at nsPath. Like DialIn's connections, the
// listener and every connection it accepts belong to that namespace for their whole life, so they
// can be used from any goroutine.
func ListenIn(nsPath, network, address string) (net.Listener, error) {
	var ln net.Listener
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		var err error
		ln, err = (&net.ListenConfig{}).Listen(context.Background(), network, address)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen %s %s in %s: %w", network, address, nsPath, err)
	}
	return ln, nil
}

// Listen listens inside the pod's network namespace, for a test that plays the pod's server
// itself (to reset, half-close or stay silent exactly when it wants). Connections to it pass the
// pod's inbound capture like any application's. The listener is closed at cleanup.
func (p *Pod) Listen(network, address string) (net.Listener, error) {
	ln, err := ListenIn(p.NetnsPath(), network, address)
	if err != nil {
		return nil, err
	}
	p.Node.Cluster.Env.Cleanup(func() { ln.Close() })
	return ln, nil
}
