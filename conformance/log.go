package conformance

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
)

// Record is one JSON log line of meshlessd (log/slog's JSON handler): "time", "level", "msg" and
// the record's attributes, groups as nested objects.
type Record map[string]any

// Get returns the value at key; a dotted key ("pod.name") reaches into groups.
func (r Record) Get(key string) (any, bool) {
	var cur any = map[string]any(r)
	for part := range strings.SplitSeq(key, ".") {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = m[part]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// String returns the value at key formatted as text ("" when absent). Numbers print as JSON
// does, so 42 is "42", not "4.2e+01".
func (r Record) String(key string) string {
	v, ok := r.Get(key)
	if !ok || v == nil {
		return ""
	}
	switch v := v.(type) {
	case string:
		return v
	case json.Number:
		return v.String()
	default:
		b, err := json.Marshal(v)
		if err != nil {
			return fmt.Sprint(v)
		}
		return string(b)
	}
}

// Has reports whether the record has key.
func (r Record) Has(key string) bool {
	_, ok := r.Get(key)
	return ok
}

// Msg returns the record's message.
func (r Record) Msg() string { return r.String("msg") }

// Level returns the record's level (DEBUG, INFO, WARN, ERROR).
func (r Record) Level() string { return r.String("level") }

// Log is a daemon log: the records in order, and the lines that were not JSON (a panic trace,
// say), which a test may want to see.
type Log struct {
	Records []Record
	Other   []string
}

// ReadLog parses a JSON-lines log file.
func ReadLog(path string) (Log, error) {
	f, err := os.Open(path)
	if err != nil {
		return Log{}, fmt.Errorf("reading log: %w", err)
	}
	defer f.Close()
	var l Log
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 4*1024*1024)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		dec := json.NewDecoder(bytes.NewReader(line))
		dec.UseNumber()
		var r Record
		if line[0] != '{' || dec.Decode(&r) != nil {
			l.Other = append(l.Other, string(line))
			continue
		}
		l.Records = append(l.Records, r)
	}
	if err := sc.Err(); err != nil {
		return l, fmt.Errorf("reading %s: %w", path, err)
	}
	return l, nil
}

// Find returns the records that match every key/value pair in kv. A key is a string (dotted
// for groups); a value is a string compared with Record.String, or a func(string) bool.
// An odd trailing key only requires the key to be present.
func (l Log) Find(kv ...any) []Record {
	var out []Record
	for _, r := range l.Records {
		if r.Match(kv...) {
			out = append(out, r)
		}
	}
	return out
}

// Since returns the log without its first n records (n = len(earlier.Records)), to look only at
// what happened after a point in a test.
func (l Log) Since(n int) Log {
	if n > len(l.Records) {
		n = len(l.Records)
	}
	return Log{Records: l.Records[n:], Other: l.Other}
}

// Match reports whether r matches every key/value pair in kv (see Log.Find).
func (r Record) Match(kv ...any) bool {
	for i := 0; i < len(kv); i += 2 {
		key := fmt.Sprint(kv[i])
		if i+1 == len(kv) {
			return r.Has(key)
		}
		if !r.Has(key) {
			return false
		}
		got := r.String(key)
		switch want := kv[i+1].(type) {
		case func(string) bool:
			if !want(got) {
				return false
			}
		default:
			if got != fmt.Sprint(want) {
				return false
			}
		}
	}
	return true
}
