package bench

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"math"
	"os"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

// pathColors are the plot's line colours.
var pathColors = map[string]color.RGBA{
	PathDirect:  {0x2c, 0x7b, 0xb6, 0xff}, // blue
	PathHAProxy: {0xd7, 0x19, 0x1c, 0xff}, // red
	PathAmbit:   {0x1a, 0x96, 0x41, 0xff}, // green
	PathQUIC:    {0x66, 0xc2, 0xa5, 0xff}, // light green

	PathWaypoint:    {0x75, 0x3a, 0x9e, 0xff}, // purple
	PathNginx:       {0xf0, 0x8c, 0x00, 0xff}, // orange
	PathHAProxyHTTP: {0x8c, 0x56, 0x4b, 0xff}, // brown
}

// writePlot draws the latency distribution of the fixed-rate runs over
// conns connections as an HdrHistogram-style percentile plot: latency (log
// scale) against percentile on a "nines" axis (0, 90, 99, 99.9, 99.99), one
// line per path. It reports false (and writes nothing) without data.
func (r *Results) writePlot(file string, conns int) (bool, error) {
	key := fmt.Sprintf("c%d", conns)
	type line struct {
		name string
		pts  [][2]float64
	}
	var lines []line
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, p := range r.Config.Paths {
		s := r.Summary[p]
		if s == nil || s.Latency[key] == nil || len(s.Latency[key].Curve) == 0 {
			continue
		}
		l := line{name: p, pts: s.Latency[key].Curve}
		for _, pt := range l.pts {
			if pt[1] > 0 && !math.IsNaN(pt[1]) {
				lo, hi = min(lo, pt[1]), max(hi, pt[1])
			}
		}
		lines = append(lines, l)
	}
	if len(lines) == 0 || !(hi > lo) {
		return false, nil
	}
	const W, H = 960, 560
	const left, right, top, bottom = 80, 30, 50, 70
	img := image.NewRGBA(image.Rect(0, 0, W, H))
	draw.Draw(img, img.Bounds(), image.White, image.Point{}, draw.Src)

	// Axes: x = -log10(1 - p/100) in [0, 4]; y = log10(ms), padded.
	ylo, yhi := math.Log10(lo)-0.05, math.Log10(hi)+0.05
	xpix := func(p float64) float64 {
		t := -math.Log10(1 - min(p, 99.99)/100)
		return left + t/4*(W-left-right)
	}
	ypix := func(ms float64) float64 {
		return float64(H-bottom) - (math.Log10(ms)-ylo)/(yhi-ylo)*float64(H-top-bottom)
	}
	grid := color.RGBA{0xdd, 0xdd, 0xdd, 0xff}
	black := color.RGBA{0, 0, 0, 0xff}
	for _, p := range []float64{0, 50, 90, 99, 99.9, 99.99} {
		x := xpix(p)
		segment(img, x, top, x, H-bottom, grid, 1)
		label(img, int(x)-len(pctLabel(p))*7/2, H-bottom+18, pctLabel(p), black)
	}
	for e := math.Floor(ylo); e <= math.Ceil(yhi); e++ {
		for _, m := range []float64{1, 2, 5} {
			ms := m * math.Pow(10, e)
			if l := math.Log10(ms); l < ylo || l > yhi {
				continue
			}
			y := ypix(ms)
			segment(img, left, y, W-right, y, grid, 1)
			s := fmt.Sprintf("%g", ms)
			label(img, left-8-len(s)*7, int(y)+4, s, black)
		}
	}
	segment(img, left, top, left, H-bottom, black, 1)
	segment(img, left, H-bottom, W-right, H-bottom, black, 1)
	label(img, left, 20, fmt.Sprintf("Latency of 1 KB HTTP/1.1 requests at %d req/s over %d connection(s), %d rounds merged",
		r.Config.QPS, conns, r.Config.Rounds), black)
	label(img, W/2-40, H-20, "percentile", black)
	label(img, 8, top-6, "latency (ms, log)", black)

	for i, l := range lines {
		c := pathColors[l.name]
		var px, py float64
		for j, pt := range l.pts {
			x, y := xpix(pt[0]), ypix(pt[1])
			if j > 0 {
				segment(img, px, py, x, y, c, 2)
			}
			px, py = x, y
		}
		ly := top + 16 + i*18
		segment(img, left+20, float64(ly-4), left+50, float64(ly-4), c, 3)
		label(img, left+58, ly, pathTitles[l.name], black)
	}

	f, err := os.Create(file)
	if err != nil {
		return false, fmt.Errorf("write plot: %w", err)
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return false, fmt.Errorf("write plot: %w", err)
	}
	return true, f.Close()
}

func pctLabel(p float64) string {
	return fmt.Sprintf("%g%%", p)
}

// segment draws a line of the given width (1 to 3 pixels).
func segment(img *image.RGBA, x0, y0, x1, y1 float64, c color.RGBA, width int) {
	n := int(math.Max(math.Abs(x1-x0), math.Abs(y1-y0))) + 1
	for i := 0; i <= n; i++ {
		t := float64(i) / float64(n)
		x, y := int(math.Round(x0+(x1-x0)*t)), int(math.Round(y0+(y1-y0)*t))
		for dx := -(width - 1) / 2; dx <= width/2; dx++ {
			for dy := -(width - 1) / 2; dy <= width/2; dy++ {
				img.SetRGBA(x+dx, y+dy, c)
			}
		}
	}
}

func label(img *image.RGBA, x, y int, s string, c color.RGBA) {
	d := &font.Drawer{Dst: img, Src: image.NewUniform(c), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
	d.DrawString(s)
}
