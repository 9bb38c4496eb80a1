import { expect, test } from "@playwright/test";
import { adminApi, card, enroll, enrollAt, staffContext } from "./helpers";

test("the member page updates live when staff act on the member from another browser", async ({ browser }) => {
  const api = await adminApi();
  const { id, position } = await enrollAt(api, "Live Tester");

  // Staff watch the member's page (a member would see only their own).
  const staff = await staffContext(browser, api);
  const portal = await staff.context.newPage();
  await portal.goto(`/members/${id}?min_position=${position}`);
  await expect(portal.getByRole("heading", { name: "Live Tester" })).toBeVisible();
  await expect(portal.getByTestId("points-balance")).toHaveText("0");
  await expect(portal.getByTestId("tier")).toHaveText("Bronze");
  // Hydrated and subscribed.
  await expect(portal.getByTestId("live-indicator")).toHaveText(/^Live$/);
  // Survives only if the page is never reloaded.
  await portal.evaluate(() => ((window as unknown as { marker: number }).marker = 42));

  const admin = staff.page;
  await admin.goto("/admin");
  const earn = card(admin, "Earn points");
  await earn.getByLabel("Member id").fill(id);
  await earn.getByLabel("Points").fill("1500");
  await earn.getByLabel("Reason").fill("Welcome gift");
  await earn.getByRole("button", { name: "Earn" }).click();

  await expect(portal.getByTestId("points-balance")).toHaveText("1,500");
  await expect(portal.getByTestId("tier")).toHaveText("Silver");
  await expect(portal.getByTestId("next-tier")).toHaveText("3,500 points to Gold");
  await expect(portal.getByText("Welcome gift")).toBeVisible();
  expect(await portal.evaluate(() => (window as unknown as { marker?: number }).marker)).toBe(42);

  // A purchase goes through the loyalty policy and shows up the same way.
  const purchase = card(admin, "Record a purchase");
  await purchase.getByLabel("Member id (empty: anonymous)").fill(id);
  await purchase.getByLabel("Amount").fill("40.00");
  await purchase.getByRole("button", { name: "Record purchase" }).click();
  await expect(portal.getByTestId("points-balance")).toHaveText("1,550"); // 40 × 1.25 at silver
  expect(await portal.evaluate(() => (window as unknown as { marker?: number }).marker)).toBe(42);

  // The member's history names who did what.
  await portal.reload();
  const history = card(portal, "History");
  await expect(history.getByTestId("actor").first()).toHaveText("policy:loyalty");
  await expect(history.getByTestId("actor").last()).toHaveText(/^key:/);
  await staff.context.close();
});

test("without JavaScript the member page renders and a staff form still works", async ({ browser }) => {
  const api = await adminApi();
  const { id, position } = await enrollAt(api, "No Script");
  const staff = await staffContext(browser, api, { javaScriptEnabled: false });
  const page = staff.page;

  // Read-your-writes: without JavaScript nothing would update the page later.
  await page.goto(`/members/${id}?min_position=${position}`);
  await expect(page.getByRole("heading", { name: "No Script" })).toBeVisible();
  await expect(page.getByTestId("points-balance")).toHaveText("0");
  await expect(page.getByText("Joined the loyalty programme")).toBeVisible();

  await page.goto("/admin");
  const earn = card(page, "Earn points");
  await earn.getByLabel("Member id").fill(id);
  await earn.getByLabel("Points").fill("250");
  await earn.getByRole("button", { name: "Earn" }).click();
  await page.waitForURL(/\/admin/);

  // The earn was acknowledged before the redirect; the projector may still be applying it, so
  // look again until it shows (without JavaScript the page cannot update itself).
  await expect(async () => {
    await page.goto(`/members/${id}`);
    await expect(page.getByTestId("points-balance")).toHaveText("250", { timeout: 1_000 });
  }).toPass({ timeout: 10_000 });

  // An error comes back in words too, after the redirect.
  await page.goto("/admin");
  const redeem = card(page, "Redeem points");
  await redeem.getByLabel("Member id").fill(id);
  await redeem.getByLabel("Points").fill("999");
  await redeem.getByRole("button", { name: "Redeem" }).click();
  await expect(card(page, "Redeem points").getByRole("alert")).toContainText("not enough points");
  // Every form's action sees the error the page came back with; only the redeem form shows it.
  await expect(page.getByRole("alert")).toHaveCount(1);
  await staff.context.close();
});

test("invalid form input shows its error message next to the form", async ({ browser }) => {
  const api = await adminApi();
  const id = await enroll(api, "Error Shown");
  const { context, page } = await staffContext(browser, api);
  await page.goto("/admin");
  const earn = card(page, "Earn points");
  await earn.getByLabel("Member id").fill(id);
  await earn.getByLabel("Points").fill("0");
  await earn.getByRole("button", { name: "Earn" }).click();
  await expect(earn.getByRole("alert")).toContainText("points must be between 1 and 1000000");

  const enrollCard = card(page, "Enroll a member");
  await enrollCard.getByLabel("Name").fill("Someone");
  await enrollCard.getByLabel("Email").fill(`${id}@example.com`); // already taken
  await enrollCard.getByRole("button", { name: "Enroll" }).click();
  await expect(enrollCard.getByRole("alert")).toContainText("already used by another member");
  await context.close();
});

test("staff can find a member by name and open the portal", async ({ browser }) => {
  const api = await adminApi();
  const id = await enroll(api, "Searchable Person");
  const { context, page } = await staffContext(browser, api);
  await page.getByRole("searchbox", { name: "Search by name or email" }).fill(id);
  await page.getByRole("button", { name: "Search" }).click();
  await page.getByRole("link", { name: "Searchable Person" }).click();
  await expect(page).toHaveURL(new RegExp(`/members/${id}$`));
  await expect(page.getByRole("heading", { name: "Searchable Person" })).toBeVisible();
  await context.close();
});
