import { expect, request, test } from "@playwright/test";
import { adminApi, card, claim, enrollAt, PASSWORD, unique } from "./helpers";

test("an admin makes a key (its token shown once), revokes it, and adds a staff member", async ({ browser }) => {
  const api = await adminApi();
  const email = `${unique("admin")}@tally.example`;
  const made = await api.post("/api/users", { data: { email, name: "Ada Admin", role: "admin" } });
  const context = await browser.newContext({ javaScriptEnabled: false });
  const page = await context.newPage();
  await claim(page, (await made.json()).access_link.url);
  await page.goto("/admin/keys");

  const create = card(page, "Create a key");
  await create.getByLabel("Name").fill("Till 7");
  await create.getByLabel("Role").selectOption("channel");
  await create.getByRole("button", { name: "Create key" }).click();
  const token = await card(page, "Create a key").getByTestId("secret").inputValue();
  expect(token).toMatch(/^tk_[0-9a-f]+_/);
  const till = await request.newContext({
    baseURL: process.env.BASE_URL ?? "http://127.0.0.1:3000",
    extraHTTPHeaders: { Authorization: `Bearer ${token}` },
  });
  const purchase = { amount_cents: 500, currency: "EUR", channel: "pos" };
  expect((await till.post("/api/transactions", { data: purchase })).status()).toBe(202);
  await page.reload();
  await expect(card(page, "Create a key").getByTestId("secret")).toHaveCount(0);

  const row = page.getByRole("row", { name: /Till 7/ });
  await row.getByRole("button", { name: "Revoke" }).click();
  await expect(page.getByRole("row", { name: /Till 7/ })).toHaveCount(0);
  expect((await till.post("/api/transactions", { data: purchase })).status()).toBe(401);

  await page.goto("/admin/people");
  const add = card(page, "Add a person");
  const staffEmail = `${unique("new-staff")}@tally.example`;
  await add.getByLabel("Name").fill("New Staff");
  await add.getByLabel("Email").fill(staffEmail);
  await add.getByRole("button", { name: "Add" }).click();
  const link = await card(page, "Add a person").getByTestId("secret").inputValue();
  await expect(page.getByRole("row", { name: new RegExp(staffEmail) })).toBeVisible();

  const staff = await browser.newContext();
  const staffPage = await staff.newPage();
  await claim(staffPage, link, PASSWORD);
  await expect(staffPage).toHaveURL(/\/admin$/);
  await expect(staffPage.getByTestId("signed-in-as")).toHaveText("New Staff (staff)");
  // Staff may not manage keys.
  const keys = await staffPage.goto("/admin/keys");
  expect(keys?.status()).toBe(403);
  await staff.close();
  await context.close();
});

test("staff see a member's card as it was right after any event of its history", async ({ browser }) => {
  const api = await adminApi();
  const { id } = await enrollAt(api, "Pat Past");
  const first = await api.post(`/api/members/${id}/points/earn`, { data: { points: 40 } });
  expect(first.status()).toBe(200);
  const position = (await first.json()).position;
  expect((await api.post(`/api/members/${id}/points/earn`, { data: { points: 2 } })).status()).toBe(200);
  const made = await api.post("/api/users", {
    data: { email: `${unique("auditor")}@tally.example`, name: "Aud Itor", role: "staff" },
  });
  const context = await browser.newContext({ javaScriptEnabled: false });
  const page = await context.newPage();
  await claim(page, (await made.json()).access_link.url);

  await page.goto(`/members/${id}?min_position=${position + 1}`);
  await expect(page.getByTestId("points-balance")).toHaveText("42");
  await page.locator(`table.history a[href$="?at_position=${position}"]`).click();
  await expect(page.getByTestId("past-card")).toContainText(`after position ${position.toLocaleString("en")}`);
  await expect(page.getByTestId("points-balance")).toHaveText("40");
  await page.getByRole("link", { name: "Back to the live card" }).click();
  await expect(page.getByTestId("points-balance")).toHaveText("42");
  await context.close();
});
