package harness

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/meshless/meshless/conformance"
)

// HTTPBody is the content nginx serves at HTTPPath: HTTPBodySize printable bytes.
var HTTPBody = bytes.Repeat([]byte("meshless-bench-1k-body\n"), HTTPBodySize/23+1)[:HTTPBodySize]

// startServers starts meshless-testapp's echo server, iperf3 and nginx in the pod, listening on
// all of the pod's addresses (the reference proxies reach them on its loopback).
func startServers(ctx context.Context, b *Bench, pod *conformance.Pod) error {
	if _, err := pod.StartServer(ctx, EchoPort); err != nil {
		return err
	}
	iperf, err := pod.Start("iperf3-server", b.Tools.IPerf3, "--server", "--port", strconv.Itoa(IPerfPort))
	if err != nil {
		return err
	}
	if err := waitListening(ctx, pod, IPerfPort, iperf); err != nil {
		return fmt.Errorf("iperf3 in %s: %w", pod, err)
	}
	return startNginx(ctx, b, pod)
}

// nginxConf serves dir/www on HTTPPort with one worker, no access log, and keep-alive
// connections that last for the whole of a wrk run. The worker runs as root: the harness's
// directories are private to root.
const nginxConf = `daemon off;
user root;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type application/octet-stream;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    client_body_temp_path %[1]s/nginx-tmp;
    proxy_temp_path %[1]s/nginx-tmp;
    fastcgi_temp_path %[1]s/nginx-tmp;
    uwsgi_temp_path %[1]s/nginx-tmp;
    scgi_temp_path %[1]s/nginx-tmp;
    server {
        listen %[2]d;
        root %[1]s/www;
    }
}
`

func startNginx(ctx context.Context, b *Bench, pod *conformance.Pod) error {
	www := filepath.Join(pod.Dir, "www")
	for _, d := range []string{www, filepath.Join(pod.Dir, "nginx-tmp")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(www, strings.TrimPrefix(HTTPPath, "/")), HTTPBody, 0o644); err != nil {
		return err
	}
	conf := filepath.Join(pod.Dir, "nginx.conf")
	if err := os.WriteFile(conf, fmt.Appendf(nil, nginxConf, pod.Dir, HTTPPort), 0o644); err != nil {
		return err
	}
	// -e: the error log from the start, not the distribution's /var/log/nginx.
	proc, err := pod.Start("nginx", b.Tools.Nginx, "-p", pod.Dir, "-c", conf, "-e", filepath.Join(pod.Dir, "nginx-error.log"))
	if err != nil {
		return err
	}
	if err := waitListening(ctx, pod, HTTPPort, proc); err != nil {
		return fmt.Errorf("nginx in %s: %w", pod, err)
	}
	return nil
}

// waitListening waits until a TCP socket in the pod listens on port, or proc exits.
func waitListening(ctx context.Context, pod *conformance.Pod, port uint16, proc *conformance.Process) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	suffix := ":" + strconv.Itoa(int(port))
	for {
		out, err := pod.Exec(ctx, "ss", "-Hltn")
		if err == nil {
			for line := range strings.SplitSeq(string(out), "\n") {
				if f := strings.Fields(line); len(f) >= 4 && strings.HasSuffix(f[3], suffix) {
					return nil
				}
			}
		}
		if done, werr := proc.Exited(); done {
			return fmt.Errorf("exited: %v: %s", werr, proc.Output())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("not listening on port %d: %w: %s", port, ctx.Err(), proc.Output())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
