package conformance

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"

	"github.com/containernetworking/cni/pkg/types"
)

// PluginCall is one direct invocation of a CNI plugin binary, the way a runtime makes it: for
// tests of what the plugin prints, which libcni would hide.
type PluginCall struct {
	Command     string // ADD, DEL, CHECK, VERSION, GC, STATUS
	ContainerID string
	Netns       string // a path (CNI_NETNS)
	IfName      string // default eth0
	Args        string // CNI_ARGS
	Stdin       []byte
}

// PluginOutput is what a plugin printed and how it exited.
type PluginOutput struct {
	Stdout, Stderr []byte
	ExitCode       int
}

// CNIError parses Stdout as a CNI error object; it fails if the plugin printed anything else.
func (o PluginOutput) CNIError() (*types.Error, error) {
	var e types.Error
	dec := json.NewDecoder(bytes.NewReader(o.Stdout))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		return nil, fmt.Errorf("stdout is not a CNI error object: %w: %q", err, o.Stdout)
	}
	if dec.More() {
		return nil, fmt.Errorf("stdout has more than one JSON value: %q", o.Stdout)
	}
	return &e, nil
}

// CallPlugin runs the plugin binary (a name in the bin dir, e.g. "meshless-cni") from inside
// the node's network namespace with the CNI environment of call. The error is only about running
// it; a plugin that fails is reported through ExitCode.
func (n *Node) CallPlugin(ctx context.Context, plugin string, call PluginCall) (PluginOutput, error) {
	if call.IfName == "" {
		call.IfName = "eth0"
	}
	bins := n.Cluster.Config.Bins
	cmd := exec.CommandContext(ctx, bins.Dir+"/"+plugin)
	cmd.Env = []string{
		"CNI_COMMAND=" + call.Command,
		"CNI_CONTAINERID=" + call.ContainerID,
		"CNI_NETNS=" + call.Netns,
		"CNI_IFNAME=" + call.IfName,
		"CNI_ARGS=" + call.Args,
		"CNI_PATH=" + bins.Dir,
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
	}
	var out PluginOutput
	var stdout, stderr bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = bytes.NewReader(call.Stdin), &stdout, &stderr
	err := n.Do(cmd.Run)
	out.Stdout, out.Stderr = stdout.Bytes(), stderr.Bytes()
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		out.ExitCode = exit.ExitCode()
	case err != nil:
		return out, fmt.Errorf("running %s %s: %w", plugin, call.Command, err)
	}
	return out, nil
}
