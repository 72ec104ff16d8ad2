package spire

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// These tests hold the source's own gRPC client and message codec against grpc-go and the
// generated types of spire-api-sdk, which the SPIRE agent itself is built with.

// fakeAgent serves the Delegated Identity API with grpc-go: each call gets the replies queued
// for it, then the status end.
type fakeAgent struct {
	delegatedidentityv1.UnimplementedDelegatedIdentityServer
	gotSelectors chan []*types.Selector
	svids        []*delegatedidentityv1.SubscribeToX509SVIDsResponse
	bundles      []*delegatedidentityv1.SubscribeToX509BundlesResponse
	end          error
}

func (a *fakeAgent) SubscribeToX509SVIDs(req *delegatedidentityv1.SubscribeToX509SVIDsRequest, stream grpc.ServerStreamingServer[delegatedidentityv1.SubscribeToX509SVIDsResponse]) error {
	a.gotSelectors <- req.GetSelectors()
	for _, r := range a.svids {
		if err := stream.Send(r); err != nil {
			return err
		}
	}
	return a.end
}

func (a *fakeAgent) SubscribeToX509Bundles(_ *delegatedidentityv1.SubscribeToX509BundlesRequest, stream grpc.ServerStreamingServer[delegatedidentityv1.SubscribeToX509BundlesResponse]) error {
	for _, r := range a.bundles {
		if err := stream.Send(r); err != nil {
			return err
		}
	}
	return a.end
}

// serveFakeAgent serves a on a unix socket and returns the socket's path.
func serveFakeAgent(t *testing.T, a *fakeAgent) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "admin.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	delegatedidentityv1.RegisterDelegatedIdentityServer(srv, a)
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	return path
}

func TestClientReadsSVIDStream(t *testing.T) {
	id := &types.SPIFFEID{TrustDomain: "cluster.local", Path: "/ns/shop/sa/buyer"}
	agent := &fakeAgent{
		gotSelectors: make(chan []*types.Selector, 1),
		svids: []*delegatedidentityv1.SubscribeToX509SVIDsResponse{
			{
				X509Svids: []*delegatedidentityv1.X509SVIDWithKey{{
					// expires_at and hint are not read; they must be skipped, not misread.
					X509Svid:    &types.X509SVID{Id: id, CertChain: [][]byte{[]byte("leaf"), []byte("intermediate")}, ExpiresAt: 1 << 40, Hint: "internal"},
					X509SvidKey: []byte("key"),
				}},
				FederatesWith: []string{"spiffe://other.org"},
			},
			{}, // no matching entry
		},
	}
	c := newAgentClient(serveFakeAgent(t, agent))
	defer c.close()
	sel := selectors(buyer.workload("uid-1"))
	stream, err := c.subscribe(context.Background(), methodSubscribeToX509SVIDs, marshalSVIDsRequest(sel))
	if err != nil {
		t.Fatal(err)
	}
	defer stream.close()

	got := <-agent.gotSelectors
	if len(got) != len(sel) {
		t.Fatalf("agent got selectors %v, want %v", got, sel)
	}
	for i, s := range got {
		if s.GetType() != sel[i].typ || s.GetValue() != sel[i].value {
			t.Errorf("selector %d: agent got %s:%s, want %s:%s", i, s.GetType(), s.GetValue(), sel[i].typ, sel[i].value)
		}
	}

	msg, err := stream.recv()
	if err != nil {
		t.Fatal(err)
	}
	svids, err := unmarshalSVIDsResponse(msg)
	if err != nil {
		t.Fatal(err)
	}
	if len(svids) != 1 || svids[0].id != "spiffe://cluster.local/ns/shop/sa/buyer" || string(svids[0].key) != "key" ||
		!slices.EqualFunc(svids[0].certChain, [][]byte{[]byte("leaf"), []byte("intermediate")}, bytes.Equal) {
		t.Errorf("first update decoded as %+v", svids)
	}
	msg, err = stream.recv()
	if err != nil {
		t.Fatal(err)
	}
	if svids, err := unmarshalSVIDsResponse(msg); err != nil || len(svids) != 0 {
		t.Errorf("empty update decoded as %+v, %v", svids, err)
	}
	// The agent ended the call with OK.
	if _, err := stream.recv(); !errors.Is(err, io.EOF) {
		t.Errorf("end of a stream the agent closed cleanly: %v, want io.EOF", err)
	}
}

func TestClientReadsBundleStream(t *testing.T) {
	want := map[string][]byte{"spiffe://cluster.local": []byte("ca1ca2"), "spiffe://other.org": []byte("ca3")}
	agent := &fakeAgent{bundles: []*delegatedidentityv1.SubscribeToX509BundlesResponse{{CaCertificates: want}}}
	c := newAgentClient(serveFakeAgent(t, agent))
	defer c.close()
	stream, err := c.subscribe(context.Background(), methodSubscribeToX509Bundles, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stream.close()
	msg, err := stream.recv()
	if err != nil {
		t.Fatal(err)
	}
	got, err := unmarshalBundlesResponse(msg)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("bundles decoded as %q, want %q", got, want)
	}
	for td, der := range want {
		if !bytes.Equal(got[td], der) {
			t.Errorf("bundle of %s decoded as %q, want %q", td, got[td], der)
		}
	}
}

func TestClientReportsAgentStatus(t *testing.T) {
	for _, tc := range []struct {
		name    string
		replies int
	}{
		{"after messages", 1},
		// An error before any message comes in the response headers ("trailers-only").
		{"trailers only", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			agent := &fakeAgent{
				gotSelectors: make(chan []*types.Selector, 1),
				end:          status.Error(codes.PermissionDenied, "caller is not authorized: not 100% delegate"),
			}
			for range tc.replies {
				agent.svids = append(agent.svids, &delegatedidentityv1.SubscribeToX509SVIDsResponse{})
			}
			c := newAgentClient(serveFakeAgent(t, agent))
			defer c.close()
			stream, err := c.subscribe(context.Background(), methodSubscribeToX509SVIDs, marshalSVIDsRequest(nil))
			if err != nil {
				t.Fatal(err)
			}
			defer stream.close()
			for range tc.replies {
				if _, err := stream.recv(); err != nil {
					t.Fatal(err)
				}
			}
			_, err = stream.recv()
			want := "rpc error: code = PermissionDenied desc = caller is not authorized: not 100% delegate"
			if err == nil || err.Error() != want {
				t.Errorf("end of the call: %v, want %q", err, want)
			}
		})
	}
}

func TestClientAgentAway(t *testing.T) {
	c := newAgentClient(filepath.Join(t.TempDir(), "no-agent.sock"))
	defer c.close()
	_, err := c.subscribe(context.Background(), methodSubscribeToX509Bundles, nil)
	if err == nil || !strings.Contains(err.Error(), "code = Unavailable") || !strings.Contains(err.Error(), "no-agent.sock") {
		t.Errorf("call without an agent: %v, want Unavailable naming the socket", err)
	}
}

func TestRequestEncoding(t *testing.T) {
	sel := []selector{{"k8s", "ns:shop"}, {"k8s", "sa:buyer"}, {"k8s", "pod-uid:1234"}}
	var req delegatedidentityv1.SubscribeToX509SVIDsRequest
	if err := proto.Unmarshal(marshalSVIDsRequest(sel), &req); err != nil {
		t.Fatal(err)
	}
	if len(req.GetSelectors()) != len(sel) || req.GetPid() != 0 {
		t.Fatalf("request decoded as %v", &req)
	}
	for i, s := range req.GetSelectors() {
		if s.GetType() != sel[i].typ || s.GetValue() != sel[i].value {
			t.Errorf("selector %d decoded as %s:%s, want %s:%s", i, s.GetType(), s.GetValue(), sel[i].typ, sel[i].value)
		}
	}
}

func TestMalformedUpdate(t *testing.T) {
	// A length that runs past the end of the message.
	if _, err := unmarshalSVIDsResponse([]byte{0x0a, 0x10, 0x01}); err == nil {
		t.Error("a truncated SVID update was accepted")
	}
	if _, err := unmarshalBundlesResponse([]byte{0x0a, 0x05, 0x0a, 0x10}); err == nil {
		t.Error("a truncated bundle update was accepted")
	}
}
