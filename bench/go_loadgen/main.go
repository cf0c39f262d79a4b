// Command bench-loadgen is the compiled load generator of bench/bench.py: the
// workloads where node (bench/loadgen.js) would cost as much CPU as the
// server it measures, on two cores that both share. It speaks the same
// protocol as loadgen.js, so bench.py reads either the same way:
//
//	bench-loadgen WORKLOAD --url ws://127.0.0.1:PORT [options]
//
// It writes JSON lines to stdout:
//
//	{"ev":"begin","pids":[...],"cpu_s":...}   the timed phase starts now (bench.py samples CPU)
//	{"ev":"end",...,"cpu_s":...}              the timed phase is over; the workload's figures
//
// and exits ("cpu_s": the CPU time this process has used so far, all its
// threads; manyrooms has more events, see manyRooms). Every workload has a
// deadline (--timeout seconds): past it, it reports what it has with
// "timeout": true; 30 s later it exits whatever happens.
//
// Workloads (the same options and figures as loadgen.js's, but manyrooms):
//
//	rtt        one client (gorilla/websocket), --count sequential round trips of
//	           --size bytes after --warmup untimed ones
//	big        the same with --size 1 MiB and at most 2 warm-up messages
//	handshake  --count connections (open, upgrade, close), --concurrency at once,
//	           with an "anchor" client kept open in the room (--anchor); bare
//	           clients (see rawConn)
//	rooms      --count distinct rooms, --concurrency at once (bare clients):
//	           connect, send, get the echo, close
//	fanout     --clients clients in one room (bare), one of them the sender of
//	           --messages messages; see fanout
//	idle       --count connections (bare) held in one room; see idle
//	manyrooms  --rooms rooms of --clients bare clients each; see manyRooms
//	connect    --count connections over --rooms rooms, --concurrency at once,
//	           each a message and its echo in a room kept open (bench/scaling.py)
//	roomrate   --clients clients in one room at --rate messages/s each; see roomRate
//
// A wss:// URL makes the bare clients speak TLS (any certificate accepted),
// for every workload but manyrooms, fanout and idle, whose pollers read the
// raw sockets.
//
// fanout, idle and manyrooms read with a few poller threads (see poller),
// not a goroutine per connection. idle waits for a line on stdin between
// opening its connections and checking them; manyrooms runs in steps, told
// on stdin (see manyRooms for the events).
package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand"
	"net"
	"net/url"
	"os"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

type options struct {
	url         string
	room        string
	count       int
	size        int
	warmup      int
	concurrency int
	anchor      bool
	timeout     float64 // seconds
	// fanout
	messages int
	window   int
	// idle
	broadcast bool
	echo      bool
	// manyrooms
	rooms    int
	clients  int     // per room
	rate     float64 // messages/s per client; 0: the rates come on stdin
	duration float64 // seconds measured per step
	settle   float64 // seconds at a step's rate before the measurement
	drain    float64 // seconds at most, after a step, for the last messages to arrive
	pollers  int     // threads reading the clients' sockets
	batch    int     // µs a poller waits after a batch
}

func parseOptions(workload string, args []string) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet(workload, flag.ContinueOnError)
	fs.StringVar(&o.url, "url", "ws://127.0.0.1:9000", "server URL (no path)")
	fs.StringVar(&o.room, "room", "bench", "room name (rooms, manyrooms: a prefix)")
	fs.IntVar(&o.count, "count", 1000, "messages, connections or rooms")
	fs.IntVar(&o.size, "size", 64, "message size in bytes")
	fs.IntVar(&o.warmup, "warmup", 200, "untimed round trips first")
	fs.IntVar(&o.concurrency, "concurrency", 16, "connections opened at once")
	fs.BoolVar(&o.anchor, "anchor", false, "handshake: keep a client in the room throughout")
	fs.Float64Var(&o.timeout, "timeout", 60, "seconds until the run reports what it has")
	fs.IntVar(&o.messages, "messages", 2000, "fanout: messages the sender sends")
	fs.IntVar(&o.window, "window", 0, "fanout: at most this many of the sender's messages not back yet (0: all at once)")
	fs.BoolVar(&o.broadcast, "broadcast", false, "idle: check that a message into the room reaches every connection")
	fs.BoolVar(&o.echo, "echo", false, "idle: wait for each connection's echo once opened (no rooms: websocketd)")
	fs.IntVar(&o.rooms, "rooms", 40, "manyrooms: rooms")
	fs.IntVar(&o.clients, "clients", 25, "manyrooms: clients per room; fanout: clients in all, the sender too")
	fs.Float64Var(&o.rate, "rate", 0, "manyrooms: messages/s per client for one step (0: read steps from stdin)")
	fs.Float64Var(&o.duration, "duration", 3, "manyrooms: seconds measured per step")
	fs.Float64Var(&o.settle, "settle", 1, "manyrooms: seconds at the new rate before the measurement")
	fs.Float64Var(&o.drain, "drain", 3, "manyrooms: seconds at most to wait for the last messages of a step")
	fs.IntVar(&o.pollers, "pollers", 1, "fanout, idle, manyrooms: threads reading the clients' sockets")
	fs.IntVar(&o.batch, "batch", 200, "fanout, idle, manyrooms: µs a poller waits after a batch, for more to arrive")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	return o, nil
}

func (o *options) deadline() time.Time {
	return time.Now().Add(seconds(o.timeout))
}

// roomURL is the URL of a room, its name escaped as loadgen.js's encodeURIComponent does.
func (o *options) roomURL(room string) string {
	return strings.TrimRight(o.url, "/") + "/" + url.PathEscape(room)
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

var stdoutMu sync.Mutex

// emit writes one JSON event line.
func emit(ev string, fields map[string]any) {
	fields["ev"] = ev
	line, err := json.Marshal(fields)
	if err != nil {
		line, _ = json.Marshal(map[string]any{"ev": ev, "error": "cannot encode the figures: " + err.Error()})
	}
	stdoutMu.Lock()
	defer stdoutMu.Unlock()
	os.Stdout.Write(append(line, '\n'))
}

func pids() []int { return []int{os.Getpid()} }

// threadCPU is the CPU time a thread of this process has used, in seconds
// (0 if it cannot be read).
func threadCPU(tid int64) float64 {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/schedstat", tid))
	if err != nil {
		return 0
	}
	ns, _ := strconv.ParseInt(strings.Fields(string(stat))[0], 10, 64)
	return float64(ns) / 1e9
}

// ownCPU is the CPU time this process has used, all its threads, in seconds.
// The events that start and end a timed phase carry it ("cpu_s"): bench.py
// could not read it from /proc once this process is exiting.
func ownCPU() float64 {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

// perSecond is n/secs, 0 for an empty interval (JSON has no NaN).
func perSecond(n float64, secs float64) float64 {
	if secs <= 0 {
		return 0
	}
	return n / secs
}

// percentile of sorted values, as loadgen.js takes it (nil when there are none).
func percentile[T int64 | float64 | uint32](sorted []T, p float64) any {
	if len(sorted) == 0 {
		return nil
	}
	return sorted[int(math.Min(float64(len(sorted)-1), math.Floor(p*float64(len(sorted)))))]
}

// errorKey names an error so that like errors count together: without the
// addresses and ports that net's errors carry.
func errorKey(err error) string {
	var sys *os.SyscallError
	var ne net.Error
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "closed by the server"
	case errors.As(err, &sys):
		return sys.Error()
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return err.Error()
}

// --------------------------------------------------------------------------
// rtt and big: one gorilla/websocket client, one message in flight.
// --------------------------------------------------------------------------

// payload is size ASCII bytes; putSeq writes a sequence number at its head.
func payload(size int) []byte { return bytes.Repeat([]byte("x"), size) }

func putSeq(msg []byte, seq int) {
	head := fmt.Sprintf("%09d", seq)
	copy(msg, head[:min(len(head), len(msg))])
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}

func sequential(o *options, warmup int) error {
	// A write buffer as big as the message: gorilla then sends it as one frame
	// (with a smaller one, a client's message goes out in fragments).
	dialer := websocket.Dialer{HandshakeTimeout: 10 * time.Second, ReadBufferSize: min(o.size+14, 64<<10),
		WriteBufferSize: o.size}
	ws, _, err := dialer.Dial(o.roomURL(o.room), nil)
	if err != nil {
		return err
	}
	defer ws.Close()
	// The deadline covers warm-up and timed phase; a lost echo ends the run then.
	deadline := o.deadline()
	ws.SetReadDeadline(deadline)
	ws.SetWriteDeadline(deadline)
	msg := payload(o.size)
	var echo bytes.Buffer
	bad := 0
	roundTrip := func(seq int) bool {
		putSeq(msg, seq)
		if err := ws.WriteMessage(websocket.TextMessage, msg); err != nil {
			bad++
			return false
		}
		_, r, err := ws.NextReader()
		if err == nil {
			echo.Reset()
			_, err = echo.ReadFrom(r)
		}
		if err != nil {
			bad++
			return false
		}
		if !bytes.Equal(echo.Bytes(), msg) {
			bad++
		}
		return true
	}
	for i := 0; i < warmup; i++ { // also starts the room's child
		if !roundTrip(i) {
			break
		}
	}
	emit("begin", map[string]any{"pids": pids(), "cpu_s": ownCPU()})
	lat := make([]float64, 0, o.count)
	t0 := time.Now()
	for done := 0; done < o.count; done++ {
		t := time.Now()
		if !roundTrip(warmup + done) {
			break
		}
		lat = append(lat, float64(time.Since(t).Nanoseconds())/1000) // µs
	}
	elapsed := time.Since(t0).Seconds()
	cpu := ownCPU()
	done := len(lat)
	sort.Float64s(lat)
	// "end" before closing: the room's child is still there for bench.py to read.
	emit("end", map[string]any{
		"messages": done, "bytes": done * o.size, "elapsed": elapsed, "bad": bad, "timeout": done < o.count,
		"msg_per_s": perSecond(float64(done), elapsed), "mb_per_s": perSecond(float64(done*o.size), elapsed) / 1e6,
		"p50_us": percentile(lat, 0.5), "p99_us": percentile(lat, 0.99), "max_us": percentile(lat, 1),
		"cpu_s": cpu,
	})
	ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""),
		time.Now().Add(time.Second))
	for { // until the server's close frame (or the deadline)
		if _, _, err := ws.NextReader(); err != nil {
			break
		}
	}
	return nil
}

// --------------------------------------------------------------------------
// A bare client: a fixed upgrade request on a TCP connection, masked frames
// out, a minimal frame parser in. It does the same on the wire as a library
// client, for a fraction of the CPU: what matters when the load generator
// and the server share two cores, and for handshakes, where a library
// dialer's HTTP machinery would cost more than the server's side.
// --------------------------------------------------------------------------

const (
	hsKey    = "dGhlIHNhbXBsZSBub25jZQ=="     // RFC 6455's example key...
	hsAccept = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" // ...and its accept value
)

var closeNormal = []byte{0x03, 0xe8} // close code 1000

// tlsConfig is set for a wss:// URL: the bare clients then speak TLS, and
// accept any certificate (the benchmark's servers use a self-signed one).
var tlsConfig *tls.Config

// upgradeRequest is the HTTP request that opens a WebSocket at roomURL.
func upgradeRequest(roomURL string) (addr string, request []byte, err error) {
	u, err := url.Parse(roomURL)
	if err != nil {
		return "", nil, err
	}
	if u.Scheme == "wss" && tlsConfig == nil {
		tlsConfig = &tls.Config{InsecureSkipVerify: true, ClientSessionCache: nil}
	}
	request = []byte("GET " + u.EscapedPath() + " HTTP/1.1\r\nHost: " + u.Host + "\r\nUpgrade: websocket\r\n" +
		"Connection: Upgrade\r\nSec-WebSocket-Key: " + hsKey + "\r\nSec-WebSocket-Version: 13\r\n\r\n")
	return u.Host, request, nil
}

type rawConn struct {
	conn net.Conn // a *net.TCPConn, or a *tls.Conn over one for a wss:// URL
	br   *bufio.Reader
	wmu  sync.Mutex // one frame at a time; guards wbuf
	wbuf []byte
	mask [4]byte
}

// dialRaw connects, sends the upgrade request and checks the 101 answer; the
// bytes after it stay in the reader.
func dialRaw(addr string, request []byte, deadline time.Time) (*rawConn, error) {
	c, err := net.DialTimeout("tcp", addr, time.Until(deadline))
	if err != nil {
		return nil, err
	}
	if tlsConfig != nil {
		tc := tls.Client(c, tlsConfig)
		tc.SetDeadline(deadline)
		if err := tc.Handshake(); err != nil {
			c.Close()
			return nil, err
		}
		c = tc
	}
	rc := &rawConn{conn: c, br: bufio.NewReaderSize(c, 4096)}
	key := rand.Uint32()
	rc.mask = [4]byte{byte(key), byte(key >> 8), byte(key >> 16), byte(key >> 24)}
	rc.conn.SetDeadline(deadline)
	if err := rc.upgrade(request); err != nil {
		rc.conn.Close()
		return nil, err
	}
	return rc, nil
}

func (rc *rawConn) upgrade(request []byte) error {
	if _, err := rc.conn.Write(request); err != nil {
		return err
	}
	return rc.readUpgrade()
}

// readUpgrade reads the answer to an upgrade request: a 101 with the right Sec-WebSocket-Accept.
func (rc *rawConn) readUpgrade() error {
	status, err := rc.br.ReadSlice('\n')
	if err != nil {
		return err
	}
	if !bytes.HasPrefix(status, []byte("HTTP/1.1 101")) {
		return errors.New(string(bytes.TrimSpace(status)))
	}
	accepted := false
	for {
		line, err := rc.br.ReadSlice('\n')
		if err != nil {
			return err
		}
		if len(bytes.TrimSpace(line)) == 0 {
			break
		}
		name, value, _ := bytes.Cut(line, []byte(":"))
		if bytes.EqualFold(bytes.TrimSpace(name), []byte("Sec-WebSocket-Accept")) {
			accepted = string(bytes.TrimSpace(value)) == hsAccept
		}
	}
	if !accepted {
		return errors.New("101 without the right Sec-WebSocket-Accept")
	}
	return nil
}

// writeFrame sends one masked frame.
func (rc *rawConn) writeFrame(opcode byte, p []byte) error {
	rc.wmu.Lock()
	defer rc.wmu.Unlock()
	rc.wbuf = appendFrame(rc.wbuf[:0], opcode, rc.mask, p)
	_, err := rc.conn.Write(rc.wbuf)
	return err
}

// appendFrame appends a whole frame, masked, to b.
func appendFrame(b []byte, opcode byte, mask [4]byte, p []byte) []byte {
	b = append(b, 0x80|opcode)
	switch n := len(p); {
	case n < 126:
		b = append(b, 0x80|byte(n))
	case n < 1<<16:
		b = append(b, 0x80|126, byte(n>>8), byte(n))
	default:
		b = append(b, 0x80|127, 0, 0, 0, 0, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
	}
	b = append(b, mask[:]...)
	start := len(b)
	b = append(b, p...)
	for i := start; i < len(b); i++ {
		b[i] ^= mask[(i-start)&3]
	}
	return b
}

// parseFrame parses the frame at the start of data (servers send them
// unmasked and, here, whole): its opcode, payload and size in all; size 0 if
// it has not all arrived.
func parseFrame(data []byte) (opcode byte, payload []byte, size int, err error) {
	if len(data) < 2 {
		return 0, nil, 0, nil
	}
	if data[1]&0x80 != 0 {
		return 0, nil, 0, errors.New("masked frame from the server")
	}
	if data[0]&0x80 == 0 || data[0]&0x0f == 0 {
		return 0, nil, 0, errors.New("fragmented message from the server")
	}
	n, head := int(data[1]&0x7f), 2
	if n >= 126 {
		ext := 2
		if n == 127 {
			ext = 8
		}
		if len(data) < 2+ext {
			return 0, nil, 0, nil
		}
		n = 0
		for _, c := range data[2 : 2+ext] {
			n = n<<8 | int(c)
		}
		head += ext
	}
	if len(data) < head+n {
		return 0, nil, 0, nil
	}
	return data[0] & 0x0f, data[head : head+n], head + n, nil
}

// readFrame reads one frame: a small one (the bare clients get nothing
// bigger than the reader's buffer). The payload is only valid until the next
// read.
func (rc *rawConn) readFrame() (opcode byte, p []byte, err error) {
	for n := 2; ; n++ { // n: the bytes to have, at least one more each time round
		if buffered := rc.br.Buffered(); buffered > n {
			n = buffered
		}
		data, err := rc.br.Peek(n)
		if err != nil {
			return 0, nil, err
		}
		opcode, p, size, err := parseFrame(data)
		if err != nil || size > 0 {
			rc.br.Discard(size)
			return opcode, p, err
		}
	}
}

// finish ends the connection after the server's close frame: a FIN, then
// what the server still sends is read until it closes too (as ws and node do).
func (rc *rawConn) finish() error {
	if cw, ok := rc.conn.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	_, err := io.Copy(io.Discard, rc.br)
	rc.conn.Close()
	return err
}

// echoAndClose sends msg as text, expects it back (the room's cat echoes it)
// and ends with the closing handshake; on any failure the connection is dropped.
func (rc *rawConn) echoAndClose(msg []byte, deadline time.Time) error {
	if err := rc.writeFrame(websocket.TextMessage, msg); err != nil {
		rc.conn.Close()
		return err
	}
	opcode, echo, err := rc.readFrame()
	if err != nil || opcode != websocket.TextMessage || !bytes.Equal(echo, msg) {
		rc.conn.Close()
		return errors.New("no echo")
	}
	return rc.closeHandshake(deadline)
}

// closeHandshake sends a close frame, waits for the server's and finishes.
func (rc *rawConn) closeHandshake(deadline time.Time) error {
	rc.conn.SetDeadline(deadline)
	if err := rc.writeFrame(websocket.CloseMessage, closeNormal); err != nil {
		rc.conn.Close()
		return err
	}
	for {
		opcode, _, err := rc.readFrame()
		if err != nil {
			rc.conn.Close()
			return fmt.Errorf("no close frame: %s", errorKey(err))
		}
		if opcode == websocket.CloseMessage {
			return rc.finish()
		}
	}
}

// --------------------------------------------------------------------------
// handshake and rooms: a step after another on --concurrency goroutines.
// --------------------------------------------------------------------------

// concurrently runs step(n) for n = 0..count-1 on --concurrency goroutines
// until the deadline; emits begin and returns the figures of "end".
func concurrently(o *options, step func(n int) error) map[string]any {
	deadline := o.deadline()
	var next int64
	var mu sync.Mutex // guards what follows
	done, failed := 0, 0
	errs := map[string]int{}
	var lat []float64
	loop := func(wg *sync.WaitGroup) {
		defer wg.Done()
		for {
			n := int(atomic.AddInt64(&next, 1) - 1)
			if n >= o.count || time.Now().After(deadline) {
				return
			}
			t := time.Now()
			err := step(n)
			us := float64(time.Since(t).Nanoseconds()) / 1000
			mu.Lock()
			if err == nil {
				done++
				lat = append(lat, us)
			} else {
				failed++
				errs[errorKey(err)]++
			}
			mu.Unlock()
		}
	}
	emit("begin", map[string]any{"pids": pids(), "cpu_s": ownCPU()})
	t0 := time.Now()
	var wg sync.WaitGroup
	for i := 0; i < o.concurrency; i++ {
		wg.Add(1)
		go loop(&wg)
	}
	wg.Wait()
	elapsed := time.Since(t0).Seconds()
	cpu := ownCPU()
	sort.Float64s(lat)
	return map[string]any{
		"done": done, "failed": failed, "errors": errs, "elapsed": elapsed, "per_s": perSecond(float64(done), elapsed),
		"timeout": done+failed < o.count, "p50_us": percentile(lat, 0.5), "p99_us": percentile(lat, 0.99),
		"cpu_s": cpu,
	}
}

const stepTimeout = 10 * time.Second // one connection's whole life, at most

func handshake(o *options) error {
	addr, request, err := upgradeRequest(o.roomURL(o.room))
	if err != nil {
		return err
	}
	var anchor *rawConn
	if o.anchor { // keeps the room's child alive
		if anchor, err = dialRaw(addr, request, time.Now().Add(stepTimeout)); err != nil {
			return fmt.Errorf("anchor: %w", err)
		}
		if err := anchor.writeFrame(websocket.TextMessage, []byte("anchor")); err != nil {
			return fmt.Errorf("anchor: %w", err)
		}
		if _, _, err := anchor.readFrame(); err != nil {
			return fmt.Errorf("anchor: no echo: %w", err)
		}
		anchor.conn.SetDeadline(time.Time{})
	}
	res := concurrently(o, func(int) error {
		deadline := time.Now().Add(stepTimeout)
		rc, err := dialRaw(addr, request, deadline)
		if err != nil {
			return err
		}
		return rc.closeHandshake(deadline)
	})
	res["connections"] = res["done"]
	delete(res, "done")
	emit("end", res)
	if anchor != nil {
		anchor.closeHandshake(time.Now().Add(5 * time.Second))
	}
	return nil
}

// connect: --count connections over --rooms rooms (--room prefix, then
// n % rooms), --concurrency at once; each one opens (TLS too for wss://),
// upgrades, sends a message and waits for its echo through the room's child
// (a moment in the room), then closes. A client is kept in each room
// throughout (opened before the timed phase), so that no child starts or
// stops while it is timed: what is measured is what a connection costs.
func connect(o *options) error {
	var anchors []*rawConn
	defer func() {
		for _, a := range anchors {
			a.closeHandshake(time.Now().Add(5 * time.Second))
		}
	}()
	requests := make([][]byte, o.rooms)
	var addr string
	msg := []byte("hello")
	for r := 0; r < o.rooms; r++ {
		a, request, err := upgradeRequest(o.roomURL(fmt.Sprintf("%s%d", o.room, r)))
		if err != nil {
			return err
		}
		addr, requests[r] = a, request
		anchor, err := dialRaw(addr, request, time.Now().Add(stepTimeout))
		if err != nil {
			return fmt.Errorf("anchor: %w", err)
		}
		anchors = append(anchors, anchor)
		if err := anchor.writeFrame(websocket.TextMessage, msg); err != nil {
			return fmt.Errorf("anchor: %w", err)
		}
		if _, _, err := anchor.readFrame(); err != nil {
			return fmt.Errorf("anchor: no echo: %w", err)
		}
		anchor.conn.SetDeadline(time.Time{})
	}
	// The anchors' reads: the echoes of the connections' messages reach them too.
	for _, a := range anchors {
		go func(a *rawConn) {
			for {
				if _, _, err := a.readFrame(); err != nil {
					return
				}
			}
		}(a)
	}
	res := concurrently(o, func(n int) error {
		deadline := time.Now().Add(stepTimeout)
		rc, err := dialRaw(addr, requests[n%o.rooms], deadline)
		if err != nil {
			return err
		}
		return rc.echoAndClose(msg, deadline)
	})
	res["connections"] = res["done"]
	delete(res, "done")
	emit("end", res)
	return nil
}

// roomrate: --clients bare clients in one room (--room), opened one after
// the other; once each has sent its upgrade request (TLS done for wss://) it
// emits {"ev":"dialed"} and waits for a line on stdin (bench.py may have
// stopped a worker meanwhile, to choose which one accepts), then reads the
// 101s and emits {"ev":"ready"}. Then each client sends --size-byte messages
// at --rate per second for --duration seconds (begin ... end), each
// broadcast to every client of the room; "end" counts the deliveries.
func roomRate(o *options) error {
	addr, request, err := upgradeRequest(o.roomURL(o.room))
	if err != nil {
		return err
	}
	var clients []*rawConn
	for i := 0; i < o.clients; i++ {
		c, err := net.DialTimeout("tcp", addr, stepTimeout)
		if err != nil {
			return err
		}
		if tlsConfig != nil {
			tc := tls.Client(c, tlsConfig)
			tc.SetDeadline(time.Now().Add(stepTimeout))
			if err := tc.Handshake(); err != nil {
				return err
			}
			c = tc
		}
		rc := &rawConn{conn: c, br: bufio.NewReaderSize(c, 4096), mask: [4]byte{1, 2, 3, 4}}
		if _, err := c.Write(request); err != nil {
			return err
		}
		clients = append(clients, rc)
	}
	emit("dialed", map[string]any{})
	bufio.NewReader(os.Stdin).ReadString('\n')
	for _, rc := range clients {
		rc.conn.SetDeadline(time.Now().Add(stepTimeout))
		if err := rc.readUpgrade(); err != nil {
			return fmt.Errorf("no 101: %v", err)
		}
		rc.conn.SetDeadline(time.Time{})
	}
	emit("ready", map[string]any{})
	var delivered int64
	var stop int32
	for _, rc := range clients {
		go func(rc *rawConn) {
			for {
				if _, _, err := rc.readFrame(); err != nil {
					return
				}
				if atomic.LoadInt32(&stop) == 0 {
					atomic.AddInt64(&delivered, 1)
				}
			}
		}(rc)
	}
	msg := payload(o.size)
	var wg sync.WaitGroup
	emit("begin", map[string]any{"pids": pids(), "cpu_s": ownCPU()})
	t0 := time.Now()
	end := t0.Add(seconds(o.duration))
	for i, rc := range clients {
		wg.Add(1)
		go func(i int, rc *rawConn) {
			defer wg.Done()
			interval := seconds(1 / o.rate)
			next := t0.Add(interval * time.Duration(i) / time.Duration(len(clients)))
			for next.Before(end) {
				time.Sleep(time.Until(next))
				rc.writeFrame(websocket.TextMessage, msg)
				next = next.Add(interval)
			}
		}(i, rc)
	}
	wg.Wait()
	time.Sleep(200 * time.Millisecond) // the last messages' deliveries
	atomic.StoreInt32(&stop, 1)
	elapsed := time.Since(t0).Seconds()
	emit("end", map[string]any{"deliveries": atomic.LoadInt64(&delivered), "elapsed": elapsed, "cpu_s": ownCPU()})
	for _, rc := range clients {
		rc.conn.Close()
	}
	return nil
}

// rooms: each step opens a room of its own (the server spawns its child).
func rooms(o *options) error {
	tag := fmt.Sprintf("%s-%d", o.room, os.Getpid())
	res := concurrently(o, func(n int) error {
		deadline := time.Now().Add(stepTimeout)
		addr, request, err := upgradeRequest(o.roomURL(fmt.Sprintf("%s-%d", tag, n)))
		if err != nil {
			return err
		}
		rc, err := dialRaw(addr, request, deadline)
		if err != nil {
			return err
		}
		return rc.echoAndClose([]byte(fmt.Sprintf("hello %d", n)), deadline)
	})
	res["rooms"] = res["done"]
	delete(res, "done")
	emit("end", res)
	return nil
}

// --------------------------------------------------------------------------
// manyrooms: --rooms rooms × --clients clients (bare) through the room's
// child; every client sends at a fixed rate, every message goes to all the
// clients of its room, the sender too.
//
// Once every client is connected and has had a first broadcast of its room,
// it emits {"ev":"ready"}, then reads commands on stdin:
//
//	rate R   one step at R messages/s per client: --settle seconds at that
//	         rate, then {"ev":"begin"}, --duration seconds measured,
//	         {"ev":"stop"}, then at most --drain seconds for the messages
//	         sent during the measurement to arrive, and {"ev":"step",...}
//	quit     (or the end of stdin) closes the clients and emits {"ev":"end"}
//
// With --rate R it runs that one step without stdin, and ends.
//
// Each message carries its step, whether it was sent during the measured
// window, its sender and its send time (the payload layout below). A step's
// figures: deliveries/s (received during the window, whatever their send
// time) against those offered (rate × clients × clients per room) and
// those sent; latency p50/p99 from the send to the arrival at each other
// client of the room, of the messages sent during the window; the
// deliveries of those that had not arrived when the drain ended (lost); and
// the CPU of the busiest poller thread (see below) during the window.
//
// A thousand clients that each receive a few dozen small messages a second
// cost a goroutine-per-connection reader two read calls (the second one
// finding nothing) and a thread wake-up per message: as much CPU as the
// server's work. Here the clients' sockets are handed, once connected, to
// --pollers threads that wait in epoll (level-triggered), read each ready
// socket once, and then pause --batch µs so that the next wake-up finds more
// to read. The time of receipt is the kernel's (SO_TIMESTAMPNS: when the
// data reached the client's socket), so neither that pause nor any delay of
// the load generator's own counts in the latency. One goroutine sends all
// the messages, each a non-blocking write (a socket that is full, i.e. a
// server that does not read, makes the message count as unsent).
// --------------------------------------------------------------------------

// The payload, ASCII, padded with 'x' to --size (at least payloadHead bytes):
//
//	[0:4] step (0: the "hello" of the setup)  [4] '1' if measured
//	[5:11] sender's number  [11:30] send time, Unix ns (the wall clock: the
//	kernel's receive timestamps are on it)
const payloadHead = 30

const maxManySize = 16 << 10 // largest --size for manyrooms: a frame always fits the read buffer

type manyClient struct {
	id     int
	fd     int
	poller *poller
	mask   [4]byte
	dead   atomic.Bool // its connection failed or the server closed it: nothing more is sent
	wmu    sync.Mutex  // one frame at a time; guards wbuf and closed
	wbuf   []byte
	closed bool // its fd is closed
	// Only its poller touches these.
	pending []byte // the start of a frame not all arrived
	hello   bool   // manyrooms: it had its room's hello; idle: a message
	// fanout: the messages received, the next sequence number expected, those
	// out of order, and when the last one expected arrived (Unix ns) and was
	// handled (ns since the run's base)
	received, next, outOfOrder int
	last, lastHandled          int64
}

// poller is one thread waiting in epoll for its share of the clients.
type poller struct {
	epfd int
	tid  atomic.Int64 // its thread, whose CPU time the steps report
	mu   sync.Mutex   // guards the figures below, taken once per epoll batch
	// The current step's figures.
	windowRecv   int64    // deliveries received in the window
	measuredRecv int64    // deliveries of the messages sent in the window
	stale        int64    // deliveries of an earlier step, received late
	bad          int64    // deliveries with a payload not ours
	lat          []uint32 // µs, the measured messages of other clients
	hellos       int64    // clients that had the hello of their room
}

// manyRun is a set of bare clients read by pollers: manyrooms' (see above);
// fanout and idle use it too, with their own onText.
type manyRun struct {
	o       *options
	onText  func(p *poller, c *manyClient, msg []byte, now, arrived int64) // a text message, on its poller
	base    time.Time
	rooms   [][]*manyClient // by room
	all     []*manyClient   // by id
	pollers []*poller

	step   atomic.Int64 // the current step's number
	t0, t1 atomic.Int64 // its measured window, ns since base

	sent    atomic.Int64 // messages sent in the window
	unsent  atomic.Int64 // due in the window, not sent: the client was dead or its socket full
	open    atomic.Int64 // client sockets not closed yet
	closing atomic.Bool  // we are closing the clients: closes are expected
	polling atomic.Bool

	errMu  sync.Mutex
	errors map[string]int
	closed int // clients the server closed, or whose connection failed, before the end
}

func (m *manyRun) now() int64 { return int64(time.Since(m.base)) }

// fail marks a client dead and counts why (unless we are closing them all).
func (m *manyRun) fail(c *manyClient, what string) {
	if c.dead.Swap(true) || m.closing.Load() {
		return
	}
	m.errMu.Lock()
	m.errors[what]++
	m.closed++
	m.errMu.Unlock()
}

var errSocketFull = errors.New("socket full")

// write sends one masked frame on a client's non-blocking socket. If the
// socket takes none of it, errSocketFull: the frame is not sent; once part of
// a frame is written, the rest follows (waiting for room, 5 s at most).
func (c *manyClient) write(opcode byte, p []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closed {
		return errors.New("closed")
	}
	c.wbuf = appendFrame(c.wbuf[:0], opcode, c.mask, p)
	b := c.wbuf
	giveUp := time.Now().Add(5 * time.Second)
	for len(b) > 0 {
		n, err := syscall.Write(c.fd, b)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN && len(b) == len(c.wbuf):
			return errSocketFull
		case err == syscall.EAGAIN && time.Now().Before(giveUp):
			time.Sleep(100 * time.Microsecond)
			continue
		case err != nil:
			return err
		}
		b = b[n:]
	}
	return nil
}

// closeFd closes a client's socket (its poller, or the end of the run, does).
func (m *manyRun) closeFd(c *manyClient) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closed {
		return
	}
	c.closed = true
	c.dead.Store(true)
	syscall.EpollCtl(c.poller.epfd, syscall.EPOLL_CTL_DEL, c.fd, nil)
	syscall.Close(c.fd)
	m.open.Add(-1)
}

// poll is a poller's thread: it reads each ready socket once and accounts
// for every frame read.
func (m *manyRun) poll(p *poller, wg *sync.WaitGroup) {
	defer wg.Done()
	runtime.LockOSThread() // a thread of its own, so that its CPU time can be read
	p.tid.Store(int64(syscall.Gettid()))
	events := make([]syscall.EpollEvent, 256)
	buf := make([]byte, 256<<10)
	oob := make([]byte, 256)
	for m.polling.Load() {
		n, err := syscall.EpollWait(p.epfd, events, 50) // ms: to see polling end
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			m.errMu.Lock()
			m.errors["epoll_wait: "+err.Error()]++
			m.errMu.Unlock()
			return
		}
		p.mu.Lock()
		for _, ev := range events[:n] {
			if c := m.all[ev.Fd]; c != nil {
				m.readable(p, c, buf, oob)
			}
		}
		p.mu.Unlock()
		if m.o.batch > 0 {
			time.Sleep(time.Duration(m.o.batch) * time.Microsecond)
		}
	}
}

func (m *manyRun) readable(p *poller, c *manyClient, buf, oob []byte) {
	k := copy(buf, c.pending)
	n, oobn, _, _, err := syscall.Recvmsg(c.fd, buf[k:], oob, 0)
	for err == syscall.EINTR {
		n, oobn, _, _, err = syscall.Recvmsg(c.fd, buf[k:], oob, 0)
	}
	if err == syscall.EAGAIN {
		return
	}
	if err != nil || n == 0 { // the server has closed (or reset) the connection
		if err != nil {
			m.fail(c, "read: "+err.Error())
		} else {
			m.fail(c, "closed by the server")
		}
		m.closeFd(c)
		return
	}
	now := m.now() // monotonic, for the measured window
	arrived := receiveTime(oob[:oobn])
	data := buf[:k+n]
	for len(data) > 0 {
		opcode, payload, size, err := parseFrame(data)
		if err != nil {
			m.fail(c, err.Error())
			m.closeFd(c)
			return
		}
		if size == 0 {
			break // the rest has not arrived yet
		}
		switch opcode {
		case websocket.TextMessage:
			m.onText(p, c, payload, now, arrived)
		case websocket.PingMessage:
			c.write(websocket.PongMessage, payload)
		case websocket.CloseMessage:
			if !m.closing.Load() { // the server's close: answer it
				code := "close frame from the server"
				if len(payload) >= 2 {
					code = fmt.Sprintf("closed by the server (%d)", int(payload[0])<<8|int(payload[1]))
				}
				m.fail(c, code)
				c.write(websocket.CloseMessage, closeNormal)
			}
			syscall.Shutdown(c.fd, syscall.SHUT_WR) // then the server closes: EOF, closeFd
		}
		data = data[size:]
	}
	c.pending = append(c.pending[:0], data...)
}

// deliver accounts for a message received now (monotonic ns since base),
// arrived in the socket at arrived (Unix ns).
func (m *manyRun) deliver(p *poller, c *manyClient, msg []byte, now, arrived int64) {
	if len(msg) < payloadHead {
		p.bad++
		return
	}
	step := digits(msg[0:4])
	if step == 0 {
		if !c.hello {
			c.hello = true
			p.hellos++
		}
		return
	}
	if now >= m.t0.Load() && now < m.t1.Load() {
		p.windowRecv++
	}
	if step != m.step.Load() {
		p.stale++
		return
	}
	if msg[4] != '1' {
		return
	}
	p.measuredRecv++
	if int(digits(msg[5:11])) != c.id {
		p.lat = append(p.lat, uint32(max64(0, arrived-digits(msg[11:30]))/1000))
	}
}

// receiveTime is the kernel's timestamp of the data of a recvmsg (Unix ns),
// from its SCM_TIMESTAMPNS control message (cmsghdr: a uint64 length, an
// int32 level and type, then a timespec; little-endian: amd64, arm64); now
// if there is none.
func receiveTime(oob []byte) int64 {
	le := binary.LittleEndian
	for len(oob) >= 16 {
		size := int(le.Uint64(oob[0:8]))
		if size < 16 || size > len(oob) {
			break
		}
		if int32(le.Uint32(oob[8:12])) == syscall.SOL_SOCKET && int32(le.Uint32(oob[12:16])) == syscall.SO_TIMESTAMPNS &&
			size >= 32 {
			return int64(le.Uint64(oob[16:24]))*1e9 + int64(le.Uint64(oob[24:32]))
		}
		oob = oob[(size+7)&^7:]
	}
	return time.Now().UnixNano()
}

func max64(a, b int64) int64 {
	if a > b {
		return a
	}
	return b
}

func digits(b []byte) int64 {
	var n int64
	for _, c := range b {
		n = n*10 + int64(c-'0')
	}
	return n
}

// putDigits writes v in decimal into b, right-aligned, zero-padded.
func putDigits(b []byte, v int64) {
	for i := len(b) - 1; i >= 0; i-- {
		b[i] = byte('0' + v%10)
		v /= 10
	}
}

// message fills msg's head; now is the send time, Unix ns.
func message(msg []byte, step int64, measured bool, sender int, now int64) {
	putDigits(msg[0:4], step)
	msg[4] = '0'
	if measured {
		msg[4] = '1'
	}
	putDigits(msg[5:11], int64(sender))
	putDigits(msg[11:30], now)
}

// send sends a step's messages, from start until t1: rate messages/s from
// each client, evenly spaced, the rooms in turn. Behind its schedule, it
// sends at once what is due.
func (m *manyRun) send(rate float64, start, t0, t1 int64, wg *sync.WaitGroup) {
	defer wg.Done()
	nRooms, perRoom := len(m.rooms), len(m.rooms[0])
	interval := 1e9 / (rate * float64(nRooms*perRoom))
	msg := payload(m.o.size)
	step := m.step.Load()
	for k := 0; ; k++ {
		due := start + int64(float64(k)*interval)
		if due >= t1 {
			return
		}
		now := m.now()
		if wait := due - now; wait > 0 {
			time.Sleep(time.Duration(wait))
			now = m.now()
		}
		if now >= t1 {
			return
		}
		c := m.rooms[k%nRooms][(k/nRooms)%perRoom]
		measured := now >= t0
		var err error
		if c.dead.Load() {
			err = errors.New("dead")
		} else {
			message(msg, step, measured, c.id, time.Now().UnixNano())
			if err = c.write(websocket.TextMessage, msg); err != nil && err != errSocketFull {
				m.fail(c, "write: "+errorKey(err))
			}
		}
		if measured {
			if err == nil {
				m.sent.Add(1)
			} else {
				m.unsent.Add(1)
			}
		}
	}
}

func (m *manyRun) sleepUntil(t int64) {
	if wait := t - m.now(); wait > 0 {
		time.Sleep(time.Duration(wait))
	}
}

// figures sums the pollers' figures up; with reset, starts them anew.
func (m *manyRun) figures(reset bool) (windowRecv, measuredRecv, stale, bad, hellos int64, lat []uint32) {
	for _, p := range m.pollers {
		p.mu.Lock()
		windowRecv += p.windowRecv
		measuredRecv += p.measuredRecv
		stale += p.stale
		bad += p.bad
		hellos += p.hellos
		if reset {
			p.windowRecv, p.measuredRecv, p.stale, p.bad = 0, 0, 0, 0
			lat, p.lat = append(lat, p.lat...), p.lat[:0]
		}
		p.mu.Unlock()
	}
	return
}

// runStep runs one step at rate messages/s per client; returns its figures.
func (m *manyRun) runStep(rate float64) map[string]any {
	o := m.o
	step := m.step.Add(1)
	m.sent.Store(0)
	m.unsent.Store(0)
	m.figures(true)
	start := m.now()
	t0 := start + int64(seconds(o.settle))
	t1 := t0 + int64(seconds(o.duration))
	m.t0.Store(t0)
	m.t1.Store(t1)
	var sender sync.WaitGroup
	sender.Add(1)
	go m.send(rate, start, t0, t1, &sender)
	pollerCPU := func() []float64 {
		cpu := make([]float64, len(m.pollers))
		for i, p := range m.pollers {
			cpu[i] = threadCPU(p.tid.Load())
		}
		return cpu
	}
	m.sleepUntil(t0)
	pollers0 := pollerCPU()
	emit("begin", map[string]any{"pids": pids(), "cpu_s": ownCPU(), "step": step, "rate": rate})
	m.sleepUntil(t1)
	pollers1 := pollerCPU()
	emit("stop", map[string]any{"step": step, "cpu_s": ownCPU()})
	busiestPoller := 0.0
	for i := range pollers1 {
		busiestPoller = math.Max(busiestPoller, 100*(pollers1[i]-pollers0[i])/o.duration)
	}
	sender.Wait()
	expected := m.sent.Load() * int64(o.clients)
	for {
		_, received, _, _, _, _ := m.figures(false)
		if received >= expected || m.now() > t1+int64(seconds(o.drain)) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	drained := float64(m.now()-t1) / 1e9
	windowRecv, received, stale, bad, _, lat := m.figures(true)
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	m.errMu.Lock()
	closed := m.closed
	m.errMu.Unlock()
	connections := o.rooms * o.clients
	return map[string]any{
		"step": step, "rate": rate, "rooms": o.rooms, "clients": o.clients, "size": o.size,
		"duration": o.duration,
		// Deliveries/s: offered (the rate asked), sent (what went out) and received.
		"offered_deliveries_per_s": rate * float64(connections) * float64(o.clients),
		"sent_deliveries_per_s":    perSecond(float64(expected), o.duration),
		"sent_per_s":               perSecond(float64(m.sent.Load()), o.duration),
		"deliveries_per_s":         perSecond(float64(windowRecv), o.duration),
		"expected":                 expected, "received": received, "lost": expected - received,
		"unsent": m.unsent.Load(), "stale": stale, "bad": bad, "drain_s": drained,
		"p50_us": percentile(lat, 0.5), "p99_us": percentile(lat, 0.99), "max_us": percentile(lat, 1),
		"latency_samples": len(lat), "closed_early": closed,
		// The load generator's busiest poller thread, in % of one core: near
		// 100%, the load generator may be what limits (more --pollers).
		"poller_cpu_pct": busiestPoller,
	}
}

// connect opens every client (--concurrency at once), then hands its socket
// over to a poller.
func (m *manyRun) connect() error {
	o := m.o
	// Fixed names (room0, room1, ...), the same every run: which worker of
	// scalesocket.py --workers owns a room depends on its name alone, so a
	// run is repeatable (a fresh server is started for each run).
	type job struct{ room, i int }
	jobs := make(chan job)
	errs := make(chan error, o.concurrency)
	var wg sync.WaitGroup
	for w := 0; w < o.concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				id := j.room*o.clients + j.i
				c, err := m.dial(o.roomURL(fmt.Sprintf("%s%d", o.room, j.room)), id, nil)
				if err != nil {
					select {
					case errs <- fmt.Errorf("room %d client %d: %s", j.room, j.i, errorKey(err)):
					default:
					}
					continue
				}
				m.rooms[j.room][j.i] = c
			}
		}()
	}
	for i := 0; i < o.clients; i++ { // a client per room in turn: every room's child starts early
		for room := 0; room < o.rooms; room++ {
			jobs <- job{room, i}
		}
	}
	close(jobs)
	wg.Wait()
	select {
	case err := <-errs:
		return err
	default:
		return nil
	}
}

// dial connects one client (with the net package), then takes its socket
// (non-blocking, as net leaves it) for a poller. prepare, if not nil, has
// the connection first (idle's echo).
func (m *manyRun) dial(roomURL string, id int, prepare func(rc *rawConn) error) (*manyClient, error) {
	addr, request, err := upgradeRequest(roomURL)
	if err != nil {
		return nil, err
	}
	rc, err := dialRaw(addr, request, time.Now().Add(stepTimeout))
	if err != nil {
		return nil, err
	}
	defer rc.conn.Close() // the duplicate below keeps the socket open
	if prepare != nil {
		if err := prepare(rc); err != nil {
			return nil, err
		}
	}
	tcp, ok := rc.conn.(*net.TCPConn)
	if !ok {
		return nil, errors.New("manyrooms reads plain TCP sockets only (no wss://)")
	}
	raw, err := tcp.SyscallConn()
	if err != nil {
		return nil, err
	}
	fd := -1
	raw.Control(func(s uintptr) { fd, err = syscall.Dup(int(s)) })
	if err != nil {
		return nil, err
	}
	syscall.CloseOnExec(fd)
	if err := syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_TIMESTAMPNS, 1); err != nil {
		syscall.Close(fd)
		return nil, err
	}
	p := m.pollers[id%len(m.pollers)]
	c := &manyClient{id: id, fd: fd, poller: p, mask: rc.mask}
	if n := rc.br.Buffered(); n > 0 { // the server spoke first
		head, _ := rc.br.Peek(n)
		c.pending = append(c.pending, head...)
	}
	m.open.Add(1)
	m.all[id] = c // before its poller can see it
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(id)}
	if err := syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_ADD, fd, &ev); err != nil {
		m.closeFd(c)
		m.all[id] = nil
		return nil, err
	}
	return c, nil
}

// greet has the first client of every room send a hello until every client
// has had its room's (a client joined before its room's child was up may
// have missed the first).
func (m *manyRun) greet(deadline time.Time) error {
	total := int64(m.o.rooms * m.o.clients)
	msg := payload(m.o.size)
	for attempt := 0; ; attempt++ {
		_, _, _, _, hellos, _ := m.figures(false)
		if hellos >= total {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("only %d of %d clients had a broadcast of their room", hellos, total)
		}
		if attempt%100 == 0 { // every second
			for _, room := range m.rooms {
				message(msg, 0, false, room[0].id, time.Now().UnixNano())
				if err := room[0].write(websocket.TextMessage, msg); err != nil {
					return fmt.Errorf("hello: %s", errorKey(err))
				}
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// shutdown closes every client (those connected: after a failed setup,
// not all are): a close frame each, then the pollers see the server's close
// frames and EOFs; 10 s at most.
func (m *manyRun) shutdown(pollers *sync.WaitGroup) {
	m.closing.Store(true)
	for _, c := range m.all {
		if c != nil && !c.dead.Load() {
			c.write(websocket.CloseMessage, closeNormal)
		}
	}
	for deadline := time.Now().Add(10 * time.Second); m.open.Load() > 0 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	m.polling.Store(false)
	pollers.Wait()
	for _, c := range m.all {
		if c != nil {
			m.closeFd(c)
		}
	}
	for _, p := range m.pollers {
		syscall.Close(p.epfd)
	}
}

func newManyRun(o *options, clients int) *manyRun {
	return &manyRun{o: o, base: time.Now(), errors: map[string]int{}, all: make([]*manyClient, clients)}
}

// startPollers starts --pollers poller threads.
func (m *manyRun) startPollers(pollers *sync.WaitGroup) error {
	m.polling.Store(true)
	for i := 0; i < m.o.pollers; i++ {
		epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
		if err != nil {
			m.polling.Store(false)
			pollers.Wait()
			return err
		}
		p := &poller{epfd: epfd}
		m.pollers = append(m.pollers, p)
		pollers.Add(1)
		go m.poll(p, pollers)
	}
	return nil
}

func manyRooms(o *options) error {
	if o.size < payloadHead || o.size > maxManySize || o.rooms < 1 || o.clients < 1 ||
		o.clients*o.rooms > 999999 || o.duration <= 0 || o.pollers < 1 {
		return fmt.Errorf("manyrooms wants %d <= --size <= %d, --rooms, --clients and --pollers >= 1"+
			" (a million clients at most) and --duration > 0", payloadHead, maxManySize)
	}
	m := newManyRun(o, o.rooms*o.clients)
	m.onText = m.deliver
	m.t1.Store(-1) // no window yet
	m.rooms = make([][]*manyClient, o.rooms)
	for room := range m.rooms {
		m.rooms[room] = make([]*manyClient, o.clients)
	}
	var pollers sync.WaitGroup
	if err := m.startPollers(&pollers); err != nil {
		return err
	}
	t := time.Now()
	err := m.connect()
	if err == nil {
		err = m.greet(time.Now().Add(20 * time.Second))
	}
	if err != nil {
		m.shutdown(&pollers)
		return err
	}
	emit("ready", map[string]any{"pids": pids(), "connections": o.rooms * o.clients, "rooms": o.rooms,
		"clients": o.clients, "setup_s": time.Since(t).Seconds()})

	var last map[string]any
	if o.rate > 0 {
		last = m.runStep(o.rate)
		emit("step", last)
	} else {
		lines := bufio.NewScanner(os.Stdin)
		for lines.Scan() {
			words := strings.Fields(lines.Text())
			if len(words) == 2 && words[0] == "rate" {
				rate, err := strconv.ParseFloat(words[1], 64)
				if err != nil || rate <= 0 {
					emit("step", map[string]any{"error": "bad rate " + words[1]})
					continue
				}
				last = m.runStep(rate)
				emit("step", last)
			} else if len(words) == 1 && words[0] == "quit" {
				break
			} else {
				emit("step", map[string]any{"error": fmt.Sprintf("unknown command %q", lines.Text())})
			}
		}
	}

	t = time.Now()
	m.shutdown(&pollers)
	m.errMu.Lock()
	defer m.errMu.Unlock()
	end := map[string]any{"connections": o.rooms * o.clients, "closed_early": m.closed, "errors": m.errors,
		"close_s": time.Since(t).Seconds(), "not_closed": m.open.Load()}
	if o.rate > 0 {
		for k, v := range last {
			end[k] = v
		}
	}
	emit("end", end)
	return nil
}

// --------------------------------------------------------------------------
// fanout: --clients bare clients in one room; the last to join, the sender,
// sends --messages messages of --size bytes (each headed by its sequence
// number, 9 digits) at once (or, with --window N, N at most not back yet);
// the room's child echoes each to every client, the sender too. Each client
// counts what it gets and checks the order; its last message's arrival is
// the kernel's timestamp (SO_TIMESTAMPNS), so the pollers' pauses (see
// poller) do not count. Figures, as loadgen.js's: deliveries/s (clients ×
// messages received, over the time from the first send to the arrival of
// the last client's last message; or until the deadline, if some never got
// them all), lost and out-of-order messages, clients closed early; and the
// busiest poller thread's CPU during the run.
// --------------------------------------------------------------------------

const seqDigits = 9 // the sequence number at the head of a fanout message

type fanRun struct {
	*manyRun
	sender      *manyClient
	ownReceived atomic.Int64  // the sender's messages back at the sender (--window)
	complete    atomic.Int64  // clients that have all the messages
	done        chan struct{} // closed when every client has them all
}

// receive accounts for a message at a client (on its poller).
func (f *fanRun) receive(p *poller, c *manyClient, msg []byte, now, arrived int64) {
	seq := -1
	if len(msg) >= seqDigits {
		seq = int(digits(msg[:seqDigits]))
	}
	if seq != c.next {
		c.outOfOrder++
	}
	c.next = seq + 1
	c.received++
	if c == f.sender {
		f.ownReceived.Add(1)
	}
	if c.received == f.o.messages {
		c.last, c.lastHandled = arrived, now
		if f.complete.Add(1) == int64(len(f.all)) {
			close(f.done)
		}
	}
}

// dialMany connects the clients ids (--concurrency at once), each to
// roomURL(id), until the deadline; returns how many connected, how many
// failed and why.
func (m *manyRun) dialMany(ids []int, roomURL func(id int) string, prepare func(rc *rawConn) error,
	deadline time.Time) (opened, failed int, errs map[string]int) {
	jobs := make(chan int)
	var mu sync.Mutex
	errs = map[string]int{}
	var wg sync.WaitGroup
	for w := 0; w < m.o.concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for id := range jobs {
				_, err := m.dial(roomURL(id), id, prepare)
				mu.Lock()
				if err == nil {
					opened++
				} else {
					failed++
					errs[errorKey(err)]++
				}
				mu.Unlock()
			}
		}()
	}
	for _, id := range ids {
		if time.Now().After(deadline) {
			break
		}
		jobs <- id
	}
	close(jobs)
	wg.Wait()
	return
}

// pollerCPU is the CPU time of each poller thread so far, in seconds.
func (m *manyRun) pollerCPU() []float64 {
	cpu := make([]float64, len(m.pollers))
	for i, p := range m.pollers {
		cpu[i] = threadCPU(p.tid.Load())
	}
	return cpu
}

// busiestPoller is the busiest poller's CPU between two pollerCPU readings, in % of one core.
func busiestPoller(a, b []float64, secs float64) float64 {
	busiest := 0.0
	for i := range b {
		busiest = math.Max(busiest, 100*(b[i]-a[i])/math.Max(secs, 1e-9))
	}
	return busiest
}

// writeAll writes b whole on a client's non-blocking socket, waiting in epoll
// (ep: the socket registered for EPOLLOUT) while it is full, until the deadline.
func (c *manyClient) writeAll(ep int, b []byte, deadline time.Time) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closed {
		return errors.New("closed")
	}
	events := make([]syscall.EpollEvent, 1)
	for len(b) > 0 {
		n, err := syscall.Write(c.fd, b)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			left := time.Until(deadline)
			if left <= 0 {
				return errors.New("timeout: the server does not read")
			}
			syscall.EpollWait(ep, events, int(math.Min(100, math.Ceil(float64(left)/1e6))))
			continue
		case err != nil:
			return err
		}
		b = b[n:]
	}
	return nil
}

func fanout(o *options) error {
	if o.clients < 1 || o.messages < 1 || o.size < seqDigits || o.size > maxManySize || o.pollers < 1 ||
		o.concurrency < 1 {
		return fmt.Errorf("fanout wants --clients, --messages, --pollers, --concurrency >= 1 and"+
			" %d <= --size <= %d", seqDigits, maxManySize)
	}
	deadline := o.deadline()
	f := &fanRun{manyRun: newManyRun(o, o.clients), done: make(chan struct{})}
	m := f.manyRun
	m.onText = f.receive
	var pollers sync.WaitGroup
	if err := m.startPollers(&pollers); err != nil {
		return err
	}
	defer m.shutdown(&pollers)
	url := o.roomURL(o.room)
	roomURL := func(int) string { return url }
	receivers := make([]int, o.clients-1) // ids 1..clients-1; the sender is 0
	for i := range receivers {
		receivers[i] = i + 1
	}
	if opened, _, errs := m.dialMany(receivers, roomURL, nil, deadline); opened < len(receivers) {
		return fmt.Errorf("%d of %d receivers could not connect in time: %v", len(receivers)-opened,
			len(receivers), errs)
	}
	// Every receiver is in the room before the first message: the sender joins last.
	if opened, _, errs := m.dialMany([]int{0}, roomURL, nil, deadline); opened < 1 {
		return fmt.Errorf("the sender could not connect in time: %v", errs)
	}
	f.sender = m.all[0]
	ep, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return err
	}
	defer syscall.Close(ep)
	if err := syscall.EpollCtl(ep, syscall.EPOLL_CTL_ADD, f.sender.fd,
		&syscall.EpollEvent{Events: syscall.EPOLLOUT}); err != nil {
		return err
	}

	cpu0 := m.pollerCPU()
	emit("begin", map[string]any{"pids": pids(), "cpu_s": ownCPU()})
	t0 := time.Now()
	window := o.window
	if window <= 0 {
		window = o.messages
	}
	// The frames go out in batches of 64 KiB at most, one write each.
	msg := payload(o.size)
	batch := make([]byte, 0, 64<<10+o.size+14)
	var sendErr error
	flush := func() {
		if len(batch) > 0 && sendErr == nil {
			sendErr = f.sender.writeAll(ep, batch, deadline)
		}
		batch = batch[:0]
	}
	for seq := 0; seq < o.messages && sendErr == nil; seq++ {
		if int64(seq)-f.ownReceived.Load() >= int64(window) {
			flush()
			for int64(seq)-f.ownReceived.Load() >= int64(window) && time.Now().Before(deadline) &&
				!f.sender.dead.Load() {
				time.Sleep(20 * time.Microsecond)
			}
		}
		putSeq(msg, seq)
		batch = appendFrame(batch, websocket.TextMessage, f.sender.mask, msg)
		if len(batch) >= 64<<10 {
			flush()
		}
	}
	flush()
	if sendErr != nil {
		m.fail(f.sender, "write: "+errorKey(sendErr))
	}

	// Until every client has them all, the deadline, or no client that lacks
	// some is still connected.
	check := time.NewTicker(50 * time.Millisecond)
	ok := false
wait:
	for {
		select {
		case <-f.done:
			ok = true
			break wait
		case <-check.C:
			if time.Now().After(deadline) {
				break wait
			}
			waiting := false
			for _, p := range m.pollers {
				p.mu.Lock()
			}
			for _, c := range m.all {
				if c.received < o.messages && !c.dead.Load() {
					waiting = true
				}
			}
			for _, p := range m.pollers {
				p.mu.Unlock()
			}
			if !waiting {
				break wait
			}
		}
	}
	check.Stop()
	end := time.Now()
	cpu1 := m.pollerCPU()
	cpu := ownCPU()

	for _, p := range m.pollers {
		p.mu.Lock()
	}
	received, outOfOrder, last, handled := 0, 0, int64(0), int64(0)
	for _, c := range m.all {
		received += c.received
		outOfOrder += c.outOfOrder
		last, handled = max64(last, c.last), max64(handled, c.lastHandled)
	}
	for _, p := range m.pollers {
		p.mu.Unlock()
	}
	m.errMu.Lock()
	closed, errs := m.closed, m.errors
	m.errMu.Unlock()
	// Until the last client had them all; or, if some never did, until now.
	elapsed, handledS := end.Sub(t0).Seconds(), any(nil)
	if ok {
		elapsed = float64(last-t0.UnixNano()) / 1e9
		handledS = float64(handled-t0.Sub(m.base).Nanoseconds()) / 1e9
	}
	expected := o.clients * o.messages
	emit("end", map[string]any{
		"clients": o.clients, "expected": expected, "received": received, "lost": expected - received,
		"out_of_order": outOfOrder, "closed_early": closed, "errors": errs, "elapsed": elapsed,
		// Until the last message was handled here, not in the socket: the
		// pollers' pauses and delays count in it (for comparison).
		"handled_s":        handledS,
		"deliveries_per_s": perSecond(float64(received), elapsed), "timeout": !ok && time.Now().After(deadline),
		"cpu_s": cpu,
		// The load generator's busiest poller thread, in % of one core: near
		// 100%, the load generator may be what limits (more --pollers).
		"poller_cpu_pct": busiestPoller(cpu0, cpu1, end.Sub(t0).Seconds()),
	})
	return nil
}

// --------------------------------------------------------------------------
// idle: --count bare clients connect to one room (--concurrency at once)
// and stay. Events: {"ev":"begin"} before the first connects, then
// {"ev":"opened","opened":N,"failed":N,"errors":{...},"open_s":S} once all
// have tried; then (bench.py reads the server's memory meanwhile) a line on
// stdin (or its end, or the deadline) has it count the connections still
// open ("held") and, with --broadcast, send one message from the first of
// them into the room and count those it reaches in 20 s ("reached"); then
// {"ev":"end",...} with all that, and it drops the connections (no close
// handshake, as loadgen.js). With --echo (a server without rooms, e.g.
// websocketd: a child per connection), each connection sends a message and
// waits for its echo (10 s at most) before it counts as opened.
// --------------------------------------------------------------------------

func idle(o *options) error {
	if o.count < 1 || o.pollers < 1 || o.concurrency < 1 {
		return errors.New("idle wants --count, --pollers and --concurrency >= 1")
	}
	deadline := o.deadline()
	m := newManyRun(o, o.count)
	m.onText = func(p *poller, c *manyClient, msg []byte, now, arrived int64) {
		if !c.hello {
			c.hello = true
			p.hellos++
		}
	}
	var pollers sync.WaitGroup
	if err := m.startPollers(&pollers); err != nil {
		return err
	}
	var prepare func(rc *rawConn) error
	if o.echo {
		hello := []byte("hello")
		prepare = func(rc *rawConn) error {
			rc.conn.SetDeadline(time.Now().Add(stepTimeout))
			if err := rc.writeFrame(websocket.TextMessage, hello); err != nil {
				return err
			}
			opcode, echo, err := rc.readFrame()
			if err != nil {
				return fmt.Errorf("echo: %s", errorKey(err))
			}
			if opcode != websocket.TextMessage || !bytes.Equal(echo, hello) {
				return errors.New("bad echo")
			}
			return nil
		}
	}
	ids := make([]int, o.count)
	for i := range ids {
		ids[i] = i
	}
	url := o.roomURL(o.room)
	emit("begin", map[string]any{"pids": pids(), "cpu_s": ownCPU()})
	t0 := time.Now()
	opened, failed, errs := m.dialMany(ids, func(int) string { return url }, prepare, deadline)
	openElapsed := time.Since(t0).Seconds()
	emit("opened", map[string]any{"opened": opened, "failed": failed, "errors": errs, "open_s": openElapsed})

	line := make(chan struct{}, 1)
	go func() {
		bufio.NewReader(os.Stdin).ReadString('\n') // a line, or the end of stdin
		line <- struct{}{}
	}()
	select {
	case <-line:
	case <-time.After(time.Until(deadline)):
	}
	held := 0
	var first *manyClient
	for _, c := range m.all {
		if c != nil && !c.dead.Load() {
			held++
			if first == nil {
				first = c
			}
		}
	}
	var reached any
	if o.broadcast && first != nil {
		// One message into the room must reach every connection held.
		if err := first.write(websocket.TextMessage, []byte("hello everyone")); err != nil {
			errs["broadcast: "+errorKey(err)]++
		}
		var hellos int64
		for give := time.Now().Add(20 * time.Second); time.Now().Before(give); {
			_, _, _, _, hellos, _ = m.figures(false)
			if hellos >= int64(held) {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		reached = hellos
	}
	m.errMu.Lock()
	closed := m.closed
	for k, v := range m.errors {
		errs[k] += v
	}
	m.errMu.Unlock()
	emit("end", map[string]any{"requested": o.count, "opened": opened, "failed": failed, "held": held,
		"closed": closed, "reached": reached, "errors": errs, "open_s": openElapsed, "cpu_s": ownCPU()})
	// Drop the connections (as loadgen.js's terminate): no close handshake.
	m.closing.Store(true)
	m.polling.Store(false)
	pollers.Wait()
	for _, c := range m.all {
		if c != nil {
			m.closeFd(c)
		}
	}
	return nil
}

func main() {
	if len(os.Args) < 2 || strings.HasPrefix(os.Args[1], "-") {
		fmt.Fprintln(os.Stderr, "usage: bench-loadgen rtt|big|handshake|rooms|fanout|idle|manyrooms --url ws://HOST:PORT [options]")
		os.Exit(2)
	}
	workload := os.Args[1]
	o, err := parseOptions(workload, os.Args[2:])
	if err != nil {
		emit("end", map[string]any{"error": err.Error()})
		os.Exit(2)
	}
	debug.SetGCPercent(400) // a little more memory, less of the collector's CPU
	// The whole run is bounded, whatever happens.
	time.AfterFunc(seconds(o.timeout+30), func() {
		emit("end", map[string]any{"error": "hard timeout", "timeout": true})
		os.Exit(2)
	})
	run := map[string]func() error{
		"rtt":       func() error { return sequential(o, o.warmup) },
		"big":       func() error { return sequential(o, min(o.warmup, 2)) },
		"handshake": func() error { return handshake(o) },
		"rooms":     func() error { return rooms(o) },
		"connect":   func() error { return connect(o) },
		"roomrate":  func() error { return roomRate(o) },
		"fanout":    func() error { return fanout(o) },
		"idle":      func() error { return idle(o) },
		"manyrooms": func() error { return manyRooms(o) },
	}[workload]
	if run == nil {
		emit("end", map[string]any{"error": "unknown workload " + workload})
		os.Exit(2)
	}
	if err := run(); err != nil {
		emit("end", map[string]any{"error": err.Error()})
		os.Exit(1)
	}
}
