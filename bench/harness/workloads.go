package harness

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/meshless/meshless/conformance"
)

// seconds rounds d to whole seconds, at least one: iperf3 and wrk take whole seconds.
func seconds(d time.Duration) string {
	return strconv.Itoa(max(1, int(d.Round(time.Second)/time.Second)))
}

// IPerfResult is what the receiving side of an iperf3 test counted.
type IPerfResult struct {
	BitsPerSecond float64
	Bytes         int64
}

// IPerf runs an iperf3 test of duration d with streams parallel streams from the variant's client
// pod to its server pod's iperf3 server.
func IPerf(ctx context.Context, b *Bench, v *Variant, streams int, d time.Duration) (IPerfResult, error) {
	t := v.Target(IPerfPort)
	out, err := v.Client.Exec(ctx, b.Tools.IPerf3, "--client", t.Addr().String(), "--port", strconv.Itoa(int(t.Port())),
		"--time", seconds(d), "--parallel", strconv.Itoa(streams), "--json")
	res, perr := ParseIPerf(out)
	if perr != nil {
		return res, fmt.Errorf("iperf3 %s: %w (run: %v)", v.Name, perr, err)
	}
	return res, nil
}

// ParseIPerf reads iperf3's --json output.
func ParseIPerf(out []byte) (IPerfResult, error) {
	var doc struct {
		Error string `json:"error"`
		End   struct {
			SumReceived struct {
				Bytes         int64   `json:"bytes"`
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return IPerfResult{}, fmt.Errorf("parsing iperf3 JSON: %w", err)
	}
	if doc.Error != "" {
		return IPerfResult{}, errors.New(doc.Error)
	}
	if doc.End.SumReceived.Bytes == 0 {
		return IPerfResult{}, errors.New("iperf3 received nothing")
	}
	return IPerfResult{BitsPerSecond: doc.End.SumReceived.BitsPerSecond, Bytes: doc.End.SumReceived.Bytes}, nil
}

// RequestResponse opens one connection to the echo server through the variant, exchanges warmup
// messages of size bytes, then n more whose round trips it returns: write the message, read it
// back in full.
func RequestResponse(ctx context.Context, v *Variant, size, warmup, n int) ([]time.Duration, error) {
	conn, err := conformance.DialIn(ctx, v.Client.NetnsPath(), "tcp", v.Target(EchoPort).String())
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(2 * time.Minute)); err != nil {
		return nil, err
	}
	if _, err := io.WriteString(conn, conformance.ModeEcho+"\n"); err != nil {
		return nil, fmt.Errorf("echo via %s: %w", v.Name, err)
	}
	msg, buf := make([]byte, size), make([]byte, size)
	for i := range msg {
		msg[i] = byte('a' + i%26)
	}
	rtts := make([]time.Duration, 0, n)
	for i := range warmup + n {
		start := time.Now()
		if _, err := conn.Write(msg); err != nil {
			return nil, fmt.Errorf("echo via %s, message %d: %w", v.Name, i, err)
		}
		if _, err := io.ReadFull(conn, buf); err != nil {
			return nil, fmt.Errorf("echo via %s, message %d: %w", v.Name, i, err)
		}
		if i >= warmup {
			rtts = append(rtts, time.Since(start))
		}
	}
	if string(buf) != string(msg) {
		return nil, fmt.Errorf("echo via %s returned other bytes than sent", v.Name)
	}
	return rtts, nil
}

// HTTPURL is the URL of nginx's 1 KiB body through the variant.
func HTTPURL(v *Variant) string {
	return fmt.Sprintf("http://%s%s", v.Target(HTTPPort), HTTPPath)
}

// WrkResult is what wrk reports.
type WrkResult struct {
	RequestsPerSecond float64
	Requests          int64
}

// Wrk runs wrk with conns keep-alive connections on threads threads for d against nginx.
func Wrk(ctx context.Context, b *Bench, v *Variant, d time.Duration, conns, threads int) (WrkResult, error) {
	out, err := v.Client.Exec(ctx, b.Tools.Wrk, "--threads", strconv.Itoa(threads), "--connections", strconv.Itoa(conns),
		"--duration", seconds(d)+"s", HTTPURL(v))
	if err != nil {
		return WrkResult{}, fmt.Errorf("wrk %s: %w", v.Name, err)
	}
	res, err := ParseWrk(out)
	if err != nil {
		return res, fmt.Errorf("wrk %s: %w", v.Name, err)
	}
	return res, nil
}

var (
	wrkRequests = regexp.MustCompile(`(?m)^\s*(\d+) requests in `)
	wrkRate     = regexp.MustCompile(`(?m)^Requests/sec:\s*([0-9.]+)`)
	wrkNon2xx   = regexp.MustCompile(`(?m)Non-2xx or 3xx responses:\s*(\d+)`)
	wrkErrors   = regexp.MustCompile(`(?m)Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
)

// ParseWrk reads wrk's report. Error answers or socket errors (other than none) fail it: the
// rate would not be of served requests.
func ParseWrk(out []byte) (WrkResult, error) {
	s := string(out)
	if m := wrkNon2xx.FindStringSubmatch(s); m != nil {
		return WrkResult{}, fmt.Errorf("%s responses were not 2xx", m[1])
	}
	if m := wrkErrors.FindStringSubmatch(s); m != nil {
		for _, n := range m[1:] {
			if n != "0" {
				return WrkResult{}, fmt.Errorf("socket errors: %s", strings.TrimSpace(m[0]))
			}
		}
	}
	rate, req := wrkRate.FindStringSubmatch(s), wrkRequests.FindStringSubmatch(s)
	if rate == nil || req == nil {
		return WrkResult{}, fmt.Errorf("no request count or rate in wrk's output: %q", s)
	}
	var res WrkResult
	var err1, err2 error
	res.RequestsPerSecond, err1 = strconv.ParseFloat(rate[1], 64)
	res.Requests, err2 = strconv.ParseInt(req[1], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return res, err
	}
	if res.Requests == 0 {
		return res, errors.New("wrk completed no request")
	}
	return res, nil
}

// HeyResult is what hey reports: successful answers over the run's total time.
type HeyResult struct {
	RequestsPerSecond float64
	OK, Errors        int64
	Total             time.Duration
}

// Hey runs hey for d with conc workers, each request on a new connection, against nginx.
func Hey(ctx context.Context, b *Bench, v *Variant, d time.Duration, conc int) (HeyResult, error) {
	out, err := v.Client.Exec(ctx, b.Tools.Hey, "-z", d.String(), "-c", strconv.Itoa(conc), "-disable-keepalive", HTTPURL(v))
	if err != nil {
		return HeyResult{}, fmt.Errorf("hey %s: %w", v.Name, err)
	}
	res, err := ParseHey(out)
	if err != nil {
		return res, fmt.Errorf("hey %s: %w", v.Name, err)
	}
	return res, nil
}

var (
	heyTotal  = regexp.MustCompile(`(?m)^\s*Total:\s*([0-9.]+) secs`)
	heyStatus = regexp.MustCompile(`(?m)^\s*\[(\d+)\]\s+(\d+) responses`)
	heyError  = regexp.MustCompile(`(?m)^\s*\[(\d+)\]\s+\S`)
)

// ParseHey reads hey's default report. Any answer but 200 fails it; errors (a request cut off at
// the end of the run, say) are counted, and fail it only if nothing succeeded.
func ParseHey(out []byte) (HeyResult, error) {
	s := string(out)
	var res HeyResult
	m := heyTotal.FindStringSubmatch(s)
	if m == nil {
		return res, fmt.Errorf("no total time in hey's output: %q", s)
	}
	secs, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return res, err
	}
	res.Total = time.Duration(secs * float64(time.Second))
	statuses, errs, _ := strings.Cut(s, "Error distribution:")
	for _, m := range heyStatus.FindAllStringSubmatch(statuses, -1) {
		n, _ := strconv.ParseInt(m[2], 10, 64)
		if m[1] != "200" {
			return res, fmt.Errorf("%d answers with status %s", n, m[1])
		}
		res.OK += n
	}
	sc := bufio.NewScanner(strings.NewReader(errs))
	for sc.Scan() {
		if m := heyError.FindStringSubmatch(sc.Text()); m != nil {
			n, _ := strconv.ParseInt(m[1], 10, 64)
			res.Errors += n
		}
	}
	if res.OK == 0 {
		return res, fmt.Errorf("no successful request (%d errors): %q", res.Errors, s)
	}
	res.RequestsPerSecond = float64(res.OK) / secs
	return res, nil
}
