import { expect, test } from "@playwright/test";
import { adminApi, claim, enroll, unique } from "./helpers";

test("the operations page draws each consumer's throughput as it moves, pushed over the socket", async ({ browser }) => {
  const api = await adminApi();
  const made = await api.post("/api/users", {
    data: { email: `${unique("operator")}@tally.example`, name: "Op Erator", role: "staff" },
  });
  const context = await browser.newContext();
  const page = await context.newPage();
  await claim(page, (await made.json()).access_link.url);
  await page.goto("/admin/operations");
  await expect(page.getByTestId("live-indicator")).toHaveClass(/on/);
  await expect(page.getByTestId("no-parked")).toBeVisible();
  const rate = page.getByTestId("chart-membership_view").locator(".spark-rate polyline");
  const drawn = async () => ((await rate.getAttribute("points")) ?? "").split(" ").length;
  // A point a second arrives without any request from the page.
  const before = await drawn();
  await expect.poll(drawn, { timeout: 5_000 }).toBeGreaterThan(before + 1);

  // Under load the line leaves its floor: some point is above the baseline (y < 46 of 48).
  const id = await enroll(api, "Busy Member");
  for (let i = 0; i < 40; i++) {
    expect((await api.post(`/api/members/${id}/points/earn`, { data: { points: 1 } })).status()).toBe(200);
  }
  const highest = async () =>
    Math.min(...((await rate.getAttribute("points")) ?? "0,48").split(" ").map((p) => Number(p.split(",")[1])));
  await expect.poll(highest, { timeout: 5_000 }).toBeLessThan(46);
  await context.close();
});

test("an admin rebuilds a projection online from the operations page while it keeps serving", async ({ browser }) => {
  const api = await adminApi();
  const id = await enroll(api, "Rebuilt Member");
  expect((await api.post(`/api/members/${id}/points/earn`, { data: { points: 120 } })).status()).toBe(200);
  const made = await api.post("/api/users", {
    data: { email: `${unique("rebuilder")}@tally.example`, name: "Re Builder", role: "admin" },
  });
  const context = await browser.newContext();
  const page = await context.newPage();
  await claim(page, (await made.json()).access_link.url);
  await page.goto("/admin/operations");
  await expect(page.getByTestId("live-indicator")).toHaveClass(/on/);
  const card = page.getByTestId("chart-membership_view");
  // Only projections can be rebuilt: the loyalty policy's card has no button.
  await expect(page.getByTestId("chart-loyalty_policy").getByRole("button", { name: "Rebuild" })).toHaveCount(0);
  await card.getByRole("button", { name: "Rebuild" }).click();
  await expect(page.getByText(/membership_view: rebuild #\d+ asked for/)).toBeVisible();
  await expect
    .poll(async () => (await (await api.get("/api/projections/membership_view/rebuild")).json()).state, {
      timeout: 20_000,
    })
    .toBe("swapped");
  // The member's page still shows the balance, from the new table.
  await page.goto(`/members/${id}`);
  await expect(page.getByTestId("points-balance")).toHaveText("120");
  await context.close();
});

test("a change captured from a system of record shows on the operations page and becomes a member", async ({ browser }) => {
  const api = await adminApi();
  const customer = Date.now();
  const event = {
    before: null,
    after: { id: customer, first_name: "Captured Customer", email: `${unique("captured")}@shop.example` },
    op: "c",
    source: { connector: "mysql", db: "inventory", table: "customers", file: "mysql-bin.000001", pos: customer, row: 0 },
  };
  const posted = await api.post("/api/cdc/shop", { data: event });
  expect(posted.status()).toBe(200);
  expect((await posted.json()).rows.applied).toBe(1);

  const made = await api.post("/api/users", {
    data: { email: `${unique("watcher")}@tally.example`, name: "Cdc Watcher", role: "staff" },
  });
  const context = await browser.newContext();
  const page = await context.newPage();
  await claim(page, (await made.json()).access_link.url);
  await page.goto("/admin/operations");
  const row = page.getByTestId("cdc-shop");
  await expect(row).toContainText("debezium");
  await expect(row).toContainText("reading");
  await page.goto(`/members/shop-${customer}`);
  await expect(page.getByText("Captured Customer").first()).toBeVisible();
  await context.close();
});
