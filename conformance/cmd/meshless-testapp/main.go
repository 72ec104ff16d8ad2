// Command meshless-testapp is the program the conformance suite runs inside pods: a server that
// echoes, sinks, sends or reports the peer address it sees (and answers plain HTTP GETs, so curl
// works against it), and a client that drives one exchange and prints a JSON verdict. It has no
// dependencies beyond the standard library so that it runs in any network namespace.
//
//	meshless-testapp server -listen :8080 [-name NAME]
//	meshless-testapp client -connect HOST:PORT -mode echo|sink|send|peer [-bytes N] [-marker M] [-timeout 30s] [-conns N]
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/meshless/meshless/conformance/internal/testproto"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: meshless-testapp server|client [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "server":
		err = serverMain(os.Args[2:])
	case "client":
		// The client reports failures in its JSON verdict; the exit status only says "not ok".
		if !clientMain(os.Args[2:]) {
			os.Exit(1)
		}
		return
	default:
		err = fmt.Errorf("unknown subcommand %q (want server or client)", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "meshless-testapp:", err)
		os.Exit(1)
	}
}

func serverMain(args []string) error {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	listen := fs.String("listen", ":8080", "address to listen on")
	name := fs.String("name", "", "name reported in HTTP answers (default: hostname)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *name == "" {
		*name, _ = os.Hostname()
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", *listen, err)
	}
	var mu sync.Mutex
	enc := json.NewEncoder(os.Stdout)
	for {
		c, err := ln.Accept()
		if err != nil {
			return fmt.Errorf("accept: %w", err)
		}
		go func() {
			entry := serve(c.(*net.TCPConn), *name)
			mu.Lock()
			defer mu.Unlock()
			// A failed log write must not stop the server; stdout is a file the harness reads.
			_ = enc.Encode(entry)
		}()
	}
}

// serve handles one connection according to its first line and returns the log entry for it.
func serve(c *net.TCPConn, name string) testproto.ConnLog {
	defer c.Close()
	entry := testproto.ConnLog{Peer: c.RemoteAddr().String(), Local: c.LocalAddr().String()}
	// Nothing in the suite legitimately idles this long; a stuck peer must not pin the server.
	if err := c.SetDeadline(time.Now().Add(5 * time.Minute)); err != nil {
		entry.Error = err.Error()
		return entry
	}
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	entry.Received = int64(len(line))
	if err != nil {
		entry.Error = fmt.Sprintf("reading command: %v", err)
		return entry
	}
	fields := strings.Fields(line)
	if len(fields) == 0 {
		entry.Error = "empty command"
		return entry
	}
	entry.Cmd = fields[0]
	w := &countWriter{w: c}
	switch fields[0] {
	case testproto.CmdEcho:
		n, err := io.Copy(w, r)
		entry.Received += n
		if err == nil {
			err = c.CloseWrite()
		}
		if err != nil {
			entry.Error = err.Error()
		}
	case testproto.CmdSink:
		d := testproto.NewDigest()
		_, err := io.Copy(d, r)
		entry.Received += d.N
		if err == nil {
			_, err = fmt.Fprintf(w, "%d %s\n", d.N, d.Sum())
		}
		if err != nil {
			entry.Error = err.Error()
		}
	case testproto.CmdSend:
		entry.Error = send(w, fields[1:])
	case testproto.CmdPeer:
		if _, err := fmt.Fprintf(w, "%s\n", c.RemoteAddr()); err != nil {
			entry.Error = err.Error()
		}
	case "GET", "HEAD":
		entry.Error = answerHTTP(r, w, c.RemoteAddr().String(), name, fields[0] == "HEAD")
	default:
		entry.Error = fmt.Sprintf("unknown command %q", fields[0])
	}
	entry.Sent = w.n
	return entry
}

func send(w io.Writer, args []string) string {
	if len(args) < 1 {
		return "send: missing byte count"
	}
	n, err := strconv.ParseInt(args[0], 10, 64)
	if err != nil || n < 0 {
		return fmt.Sprintf("send: bad byte count %q", args[0])
	}
	marker := ""
	if len(args) > 1 {
		marker = args[1]
	}
	if _, err := io.Copy(w, testproto.NewPayload(n, marker)); err != nil {
		return err.Error()
	}
	return ""
}

// answerHTTP serves a minimal HTTP/1.0 answer naming the peer, so that curl (a kubelet-like probe)
// can talk to the same server as the test clients.
func answerHTTP(r *bufio.Reader, w io.Writer, peer, name string, head bool) string {
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return fmt.Sprintf("reading HTTP headers: %v", err)
		}
		if strings.TrimRight(l, "\r\n") == "" {
			break
		}
	}
	body := fmt.Sprintf("peer=%s\nserver=%s\n", peer, name)
	hdr := fmt.Sprintf("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n", len(body))
	if !head {
		hdr += body
	}
	if _, err := io.WriteString(w, hdr); err != nil {
		return err.Error()
	}
	return ""
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}

func clientMain(args []string) bool {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	target := fs.String("connect", "", "server address HOST:PORT")
	mode := fs.String("mode", testproto.CmdEcho, "echo, sink, send or peer")
	size := fs.Int64("bytes", 1024, "payload size")
	marker := fs.String("marker", "", "string written at the start of the payload and every 4096 bytes")
	timeout := fs.Duration("timeout", 60*time.Second, "deadline for the whole exchange")
	conns := fs.Int("conns", 1, "echo on this many connections open at the same time (echo mode only)")
	res := testproto.Result{Mode: *mode}
	if err := fs.Parse(args); err != nil {
		res.Error, res.ErrorKind = err.Error(), testproto.KindOther
	} else if *conns < 1 || (*conns > 1 && *mode != testproto.CmdEcho) {
		res.Mode, res.Target = *mode, *target
		res.Error, res.ErrorKind = "-conns must be 1, or more with -mode echo", testproto.KindOther
	} else {
		res.Mode, res.Target = *mode, *target
		start := time.Now()
		if *conns > 1 {
			runConcurrent(&res, *target, *conns, *size, *marker, *timeout)
		} else {
			run(&res, *target, *mode, *size, *marker, *timeout)
		}
		res.DurationMS = time.Since(start).Milliseconds()
	}
	// A failed exchange is never byte exact, even when the bytes that did arrive agree (a client
	// reset before it wrote anything has an empty echo of its empty payload).
	if res.Error != "" {
		res.Match = false
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		fmt.Fprintln(os.Stderr, "meshless-testapp:", err)
		return false
	}
	return res.Error == "" && res.Match
}

// fail records err as the exchange's error, unless an earlier one is already recorded.
func fail(res *testproto.Result, err error) {
	if res.Error == "" {
		res.Error, res.ErrorKind = err.Error(), testproto.Kind(err)
	}
}

// dial connects to target and sets the deadline of the whole exchange; it records a failure in
// res and returns nil.
func dial(res *testproto.Result, target string, timeout time.Duration) *net.TCPConn {
	conn, err := net.DialTimeout("tcp", target, timeout)
	if err != nil {
		fail(res, err)
		return nil
	}
	c := conn.(*net.TCPConn)
	res.Connected, res.Local = true, c.LocalAddr().String()
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		c.Close()
		fail(res, err)
		return nil
	}
	return c
}

func run(res *testproto.Result, target, mode string, size int64, marker string, timeout time.Duration) {
	c := dial(res, target, timeout)
	if c == nil {
		return
	}
	defer c.Close()
	exchange(res, c, mode, size, marker, nil)
}

// runConcurrent runs an echo exchange on each of n connections. Every connection first echoes
// one byte, which crosses the proxies at both ends, and then waits until all n have done so:
// the n connections are open end to end at the same time before the rest of the payloads flow.
// The verdict sums the byte counts and matches only if every exchange matched.
func runConcurrent(res *testproto.Result, target string, n int, size int64, marker string, timeout time.Duration) {
	start := time.Now()
	results := make([]testproto.Result, n)
	var open, all sync.WaitGroup // open: connections not yet open end to end (nor failed)
	open.Add(n)
	for i := range results {
		all.Go(func() {
			var once sync.Once
			arrive := func() { once.Do(open.Done) }
			// A connection that fails before the barrier must not hold the others back.
			defer arrive()
			r := &results[i]
			c := dial(r, target, timeout)
			if c == nil {
				return
			}
			defer c.Close()
			exchange(r, c, testproto.CmdEcho, size, marker, func() {
				arrive()
				open.Wait()
			})
		})
	}
	open.Wait()
	res.OpenMS = time.Since(start).Milliseconds()
	all.Wait()
	res.Conns, res.Connected = n, true
	var first *testproto.Result
	for i := range results {
		r := &results[i]
		res.Sent += r.Sent
		res.Received += r.Received
		res.Connected = res.Connected && r.Connected
		if r.Error != "" || !r.Match {
			res.Failed++
			if first == nil {
				first = r
			}
		}
	}
	res.Match = res.Failed == 0
	if first != nil {
		res.Error = fmt.Sprintf("%d of %d exchanges failed; first (from %s): %s", res.Failed, n, first.Local, first.Error)
		res.ErrorKind = first.ErrorKind
		if first.Error == "" {
			res.Error += "payload mismatch"
			res.ErrorKind = testproto.KindOther
		}
	}
}

// exchange runs mode on c. For echo with a non-nil synced, the command and the first payload
// byte are sent and that byte read back before synced is called and the rest flows.
func exchange(res *testproto.Result, c *net.TCPConn, mode string, size int64, marker string, synced func()) {
	switch mode {
	case testproto.CmdEcho, testproto.CmdSink:
		sent := testproto.NewDigest()
		payload := io.TeeReader(testproto.NewPayload(size, marker), sent)
		got := testproto.NewDigest()
		cmd := mode + "\n"
		if synced != nil && mode == testproto.CmdEcho && size > 0 {
			first := make([]byte, 1)
			if _, err := io.ReadFull(payload, first); err != nil {
				fail(res, err)
				return
			}
			if _, err := c.Write(append([]byte(cmd), first...)); err != nil {
				fail(res, err)
				return
			}
			if _, err := io.CopyN(got, c, 1); err != nil {
				fail(res, err)
				return
			}
			cmd = ""
			synced()
		}
		var wg sync.WaitGroup
		var werr error
		wg.Add(1)
		// Write and read at once: a multi-MiB echo would deadlock on full buffers otherwise.
		go func() {
			defer wg.Done()
			werr = writeAll(c, cmd, payload)
		}()
		var reply strings.Builder
		var dst io.Writer = got
		if mode == testproto.CmdSink {
			dst = &reply
		}
		_, rerr := io.Copy(dst, c)
		wg.Wait()
		res.Sent, res.SentSHA256 = sent.N, sent.Sum()
		if mode == testproto.CmdSink {
			res.Received = int64(reply.Len())
			res.Reply = strings.TrimSpace(reply.String())
			res.Match = res.Reply == fmt.Sprintf("%d %s", sent.N, sent.Sum())
		} else {
			res.Received, res.ReceivedSHA256 = got.N, got.Sum()
			res.Match = got.N == sent.N && got.Sum() == sent.Sum()
		}
		// The read side sees how the connection ended (a reset, say); a write that failed
		// because of it says less, so it is reported only when the read side was fine.
		if rerr != nil {
			fail(res, rerr)
		}
		if werr != nil {
			fail(res, werr)
		}
		if res.Error == "" && !res.Match && res.Received == 0 {
			// The server closed without answering: report it as EOF, not as a silent mismatch.
			fail(res, io.EOF)
		}
	case testproto.CmdSend:
		cmd := fmt.Sprintf("%s %d", testproto.CmdSend, size)
		if marker != "" {
			cmd += " " + marker
		}
		if _, err := io.WriteString(c, cmd+"\n"); err != nil {
			fail(res, err)
			return
		}
		got := testproto.NewDigest()
		if _, err := io.Copy(got, c); err != nil {
			fail(res, err)
		}
		res.Received, res.ReceivedSHA256 = got.N, got.Sum()
		res.Match = got.N == size && got.Sum() == testproto.PayloadSHA256(size, marker)
	case testproto.CmdPeer:
		if _, err := io.WriteString(c, testproto.CmdPeer+"\n"); err != nil {
			fail(res, err)
			return
		}
		b, err := io.ReadAll(io.LimitReader(c, 4096))
		if err != nil {
			fail(res, err)
		}
		res.Received, res.Reply = int64(len(b)), strings.TrimSpace(string(b))
		res.Match = res.Reply != ""
		if !res.Match && res.Error == "" {
			fail(res, io.EOF)
		}
	default:
		fail(res, errors.New("unknown mode "+mode))
	}
}

// writeAll writes the command line and the payload, then half-closes so the server sees EOF.
func writeAll(c *net.TCPConn, cmd string, payload io.Reader) error {
	if cmd != "" {
		if _, err := io.WriteString(c, cmd); err != nil {
			return err
		}
	}
	if _, err := io.Copy(c, payload); err != nil {
		return err
	}
	return c.CloseWrite()
}
