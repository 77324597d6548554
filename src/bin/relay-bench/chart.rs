//! The chart beside the table: for every row with two rates, the relay's and the
//! baseline's events/s as a pair of bars, with the ratio and the target beside the
//! scenario's name. Rows whose rates differ by orders of magnitude get a panel of their
//! own, each on a linear axis, so a bar's length still reads as the ratio it shows.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{REFERENCE, Row, thousands};

/// Width of the image, pixels.
const WIDTH: u32 = 1000;
/// Title, caption and legend above the panels.
const HEAD_H: u32 = 78;
/// The scenario names and ratios left of the bars.
const LABEL_W: u32 = 340;
/// One scenario: its two bars and the gap to the next.
const ROW_H: u32 = 52;
/// The axis under each panel (tick labels).
const AXIS_H: u32 = 26;
/// Space under each panel.
const GAP_H: u32 = 20;
/// A row whose larger rate is below the panel's largest divided by this goes to a
/// panel of its own: below it its bars would be too short to compare.
const SCALE_SPLIT: f64 = 12.0;
/// Right of the axis: room for half of its last tick label.
const MARGIN_RIGHT: u32 = 36;
/// Gap between a bar's end and its figure.
const FIGURE_GAP: i32 = 6;
/// Width of one character of a bar's figure, generous: SVG text is laid out by the
/// viewer's font, so this can only be an estimate.
const FIGURE_CHAR_PX: f64 = 7.2;

const RELAY: RGBColor = RGBColor(37, 99, 170);
const BASELINE: RGBColor = RGBColor(168, 174, 184);
const TEXT: RGBColor = RGBColor(34, 34, 34);
const MUTED: RGBColor = RGBColor(96, 96, 96);
const MET: RGBColor = RGBColor(22, 122, 54);
const MISSED: RGBColor = RGBColor(190, 30, 30);

/// One pair of bars: a table row that has a relay rate and a baseline rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair<'a> {
    /// The table row it comes from (name, formatted figures, ratio, target, verdict).
    pub row: &'a Row,
    /// Its place in the table, so panels keep the table's order.
    pub index: usize,
    /// The relay's events/s.
    pub relay: f64,
    /// The baseline's events/s.
    pub baseline: f64,
}

impl Pair<'_> {
    fn peak(&self) -> f64 {
        self.relay.max(self.baseline)
    }
}

/// The rows with two rates, in panels by scale: one holds every pair within
/// [`SCALE_SPLIT`] of the largest rate, the next the same of what is left, and so on.
/// Panels and the rows within them keep the table's order.
pub fn panels(rows: &[Row]) -> Vec<Vec<Pair<'_>>> {
    let mut left: Vec<Pair<'_>> = rows
        .iter()
        .enumerate()
        .filter_map(|(index, row)| {
            let (relay, baseline) = row.rates?;
            (relay.is_finite() && baseline.is_finite()).then_some(Pair {
                row,
                index,
                relay: relay.max(0.0),
                baseline: baseline.max(0.0),
            })
        })
        .collect();
    let mut panels = Vec::new();
    while !left.is_empty() {
        let top = left.iter().map(Pair::peak).fold(0.0, f64::max);
        let (this, rest): (Vec<_>, Vec<_>) = left
            .into_iter()
            .partition(|p| p.peak() * SCALE_SPLIT >= top);
        panels.push(this);
        left = rest;
    }
    panels.sort_by_key(|p| p[0].index);
    panels
}

/// The chart of `rows` as an SVG document, `caption` under the title; `None` when no
/// row has two rates to draw.
pub fn render(rows: &[Row], caption: &str) -> anyhow::Result<Option<String>> {
    let panels = panels(rows);
    if panels.is_empty() {
        return Ok(None);
    }
    let rows_drawn: usize = panels.iter().map(Vec::len).sum();
    let height = HEAD_H + rows_drawn as u32 * ROW_H + panels.len() as u32 * (AXIS_H + GAP_H);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        head(&root, caption)?;
        let mut top = HEAD_H;
        for panel in &panels {
            let h = panel.len() as u32 * ROW_H + AXIS_H;
            let area = root.clone().shrink((0, top), (WIDTH, h));
            draw_panel(&root, &area, panel)?;
            top += h + GAP_H;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(Some(svg))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// Plotters' errors borrow the backend; the chart's caller only needs the words.
fn draw_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e}")
}

/// Title, caption, and the legend of the two bar colours.
fn head(root: &Area<'_>, caption: &str) -> anyhow::Result<()> {
    let left = |size| ("sans-serif", size).into_font().color(&TEXT);
    let bold = ("sans-serif", 22, FontStyle::Bold).into_font().color(&TEXT);
    root.draw(&Text::new(
        "relay-bench: the relay and its baseline, same run, events/s (medians)",
        (16, 10),
        bold,
    ))
    .map_err(draw_error)?;
    root.draw(&Text::new(
        caption.to_owned(),
        (16, 36),
        left(15).color(&MUTED),
    ))
    .map_err(draw_error)?;
    let y = 58;
    for (i, (colour, what)) in [
        (RELAY, "relay"),
        (BASELINE, "baseline, labelled with what it is"),
    ]
    .into_iter()
    .enumerate()
    {
        let x = 16 + i as i32 * 110;
        root.draw(&Rectangle::new([(x, y), (x + 14, y + 14)], colour.filled()))
            .map_err(draw_error)?;
        root.draw(&Text::new(
            what,
            (x + 20, y + 7),
            left(15).pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(draw_error)?;
    }
    Ok(())
}

/// Where a panel's axis ends: far enough right that every bar's figure fits after it.
pub fn axis_end(panel: &[Pair<'_>]) -> f64 {
    let width = f64::from(WIDTH - LABEL_W - MARGIN_RIGHT);
    panel
        .iter()
        .flat_map(|p| [(p.relay, &p.row.relay), (p.baseline, &p.row.baseline)])
        .map(|(rate, figure)| {
            let text = f64::from(FIGURE_GAP) + figure.chars().count() as f64 * FIGURE_CHAR_PX;
            // rate / end * width + text <= width, with a bar at least a third wide.
            rate * width / (width - text).max(width / 3.0)
        })
        .fold(1.0, f64::max)
}

/// One panel: a linear axis of events/s, each pair's bars with their figures at the
/// ends, and the scenario's name, ratio and target left of them on `root`.
fn draw_panel(root: &Area<'_>, area: &Area<'_>, panel: &[Pair<'_>]) -> anyhow::Result<()> {
    let n = panel.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .margin_right(MARGIN_RIGHT)
        .x_label_area_size(AXIS_H)
        .y_label_area_size(LABEL_W)
        .build_cartesian_2d(0.0..axis_end(panel), 0.0..n)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_labels(6)
        .x_label_formatter(&|v| format!("{}/s", thousands(*v)))
        .label_style(("sans-serif", 14).into_font().color(&MUTED))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(228, 228, 228))
        .axis_style(MUTED)
        .draw()
        .map_err(draw_error)?;
    let figure = ("sans-serif", 14)
        .into_font()
        .color(&TEXT)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (i, pair) in panel.iter().enumerate() {
        // Row i from the top: band [n - 1 - i, n - i], relay above the baseline.
        let band = n - 1.0 - i as f64;
        for (rate, label, colour, (y0, y1)) in [
            (pair.relay, &pair.row.relay, RELAY, (0.52, 0.86)),
            (pair.baseline, &pair.row.baseline, BASELINE, (0.14, 0.48)),
        ] {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(0.0, band + y0), (rate, band + y1)],
                    colour.filled(),
                )))
                .map_err(draw_error)?;
            let (x, y) = chart.backend_coord(&(rate, band + (y0 + y1) / 2.0));
            root.draw(&Text::new(
                label.clone(),
                (x + FIGURE_GAP, y),
                figure.clone(),
            ))
            .map_err(draw_error)?;
        }
        let (x, y) = chart.backend_coord(&(0.0, band + 0.5));
        let name = ("sans-serif", 16)
            .into_font()
            .color(&TEXT)
            .pos(Pos::new(HPos::Right, VPos::Bottom));
        root.draw(&Text::new(pair.row.scenario.clone(), (x - 10, y), name))
            .map_err(draw_error)?;
        let (verdict, colour) = match pair.row.met {
            Some(true) => ("met", MET),
            Some(false) => ("not met", MISSED),
            None => ("not judged", MUTED),
        };
        let ratio = ("sans-serif", 15)
            .into_font()
            .color(&colour)
            .pos(Pos::new(HPos::Right, VPos::Top));
        let said = if pair.row.target == REFERENCE {
            format!("ratio {}: a reference, no target", pair.row.ratio)
        } else {
            format!(
                "ratio {}, target {}: {verdict}",
                pair.row.ratio, pair.row.target
            )
        };
        root.draw(&Text::new(said, (x - 10, y + 3), ratio))
            .map_err(draw_error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Row> {
        vec![
            Row::rate("1 inline", 24_000.0, 59_000.0, "direct", 0.4, true, None),
            Row::latency("1 inline: p50 / p99", (1.0, 4.0), (0.5, 0.8), 2.0, true),
            Row::rate("3 queue-first", 11_700.0, 22_000.0, "raw", 0.8, true, None),
            Row::capacity(
                "5 capacity 4",
                (76.0, 0.05, 1.0),
                (71.0, 0.97, 0.14),
                80.0,
                0.8,
                0.1,
                true,
                None,
            ),
            Row::peak_rss(21.4, true),
        ]
    }

    #[test]
    fn only_rows_with_two_rates_are_drawn_and_far_smaller_ones_get_their_own_panel() {
        let rows = rows();
        let panels = panels(&rows);
        let names: Vec<Vec<&str>> = panels
            .iter()
            .map(|p| p.iter().map(|b| b.row.scenario.as_str()).collect())
            .collect();
        assert_eq!(
            names,
            vec![vec!["1 inline", "3 queue-first"], vec!["5 capacity 4"]]
        );
        assert_eq!((panels[1][0].relay, panels[1][0].baseline), (76.0, 71.0));
        // The axis leaves room for the longest figure after its bar.
        let end = axis_end(&panels[1]);
        assert!(end > 76.0 * 1.3, "{end}");
        assert!(super::panels(&[Row::peak_rss(1.0, true)]).is_empty());
    }

    #[test]
    fn the_svg_has_one_pair_of_bars_per_row_with_its_name_and_ratio() {
        let svg = render(&rows(), "machine: test").unwrap().unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        let fill = |c: RGBColor| format!("fill=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2);
        // Three pairs, and one swatch of each colour in the legend.
        assert_eq!(svg.matches(&fill(RELAY)).count(), 3 + 1);
        assert_eq!(svg.matches(&fill(BASELINE)).count(), 3 + 1);
        for text in [
            "1 inline",
            "3 queue-first",
            "5 capacity 4",
            "24,000/s",
            "59,000/s direct",
            "ratio 0.41, target &gt;= 0.40: met",
            "ratio 0.53, target &gt;= 0.80: not met",
            "&lt; 10% 503",
            "machine: test",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(!svg.contains("p50 / p99") && !svg.contains("peak RSS"));
        assert_eq!(render(&[Row::peak_rss(1.0, true)], "").unwrap(), None);
    }

    #[test]
    fn a_reference_row_is_drawn_with_its_ratio_and_no_verdict() {
        let rows = [Row::reference(
            "3 floor",
            12_000.0,
            15_000.0,
            crate::report::FLOOR,
            20_000.0,
            "raw",
        )];
        let svg = render(&rows, "m").unwrap().unwrap();
        for text in [
            "ratio 0.80: a reference, no target",
            "15,000/s least forwarder (0.75 of raw)",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(!svg.contains("not judged") && !svg.contains("not met"));
    }
}
