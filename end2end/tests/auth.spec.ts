import { expect, test } from "@playwright/test";
import { adminApi, card, claim, enroll, join, PASSWORD, signIn, staffContext } from "./helpers";

test("a visitor joins, lands on their own page, and it updates live under the page's CSP", async ({ browser }) => {
  const context = await browser.newContext();
  const page = await context.newPage();
  const refused: string[] = [];
  page.on("console", (message) => {
    if (/Content[- ]Security[- ]Policy/i.test(message.text())) refused.push(message.text());
  });
  const { id } = await join(page, "Joined Live");
  await expect(page.getByRole("heading", { name: "Joined Live" })).toBeVisible();
  await expect(page.getByTestId("live-indicator")).toHaveText(/^Live$/);
  await expect(page.getByTestId("signed-in-as")).toHaveText(`member ${id}`);

  const api = await adminApi();
  expect((await api.post(`/api/members/${id}/points/earn`, { data: { points: 120 } })).status()).toBe(200);
  await expect(page.getByTestId("points-balance")).toHaveText("120");

  // Their own forms: a redeem shows up in the card, live.
  const redeem = card(page, "Redeem a reward");
  await redeem.getByLabel("Points").fill("20");
  await redeem.getByLabel("Reward").fill("Tote bag");
  await redeem.getByRole("button", { name: "Redeem" }).click();
  await expect(page.getByTestId("points-balance")).toHaveText("100");
  await expect(redeem.getByRole("status")).toContainText("Redeemed 20 points.");
  expect(refused, "nothing was refused by the Content-Security-Policy").toEqual([]);
  await context.close();
});

test("a member sees only their own page and cannot open the staff console", async ({ browser }) => {
  const api = await adminApi();
  const other = await enroll(api, "Someone Else");
  const context = await browser.newContext();
  const page = await context.newPage();
  await join(page, "Curious Member");

  const response = await page.goto(`/members/${other}`);
  expect(response?.status()).toBe(404);
  await expect(page.getByRole("heading", { name: "Member not found" })).toBeVisible();
  await expect(page.getByText("Someone Else")).toHaveCount(0);

  const admin = await page.goto("/admin");
  expect(admin?.status()).toBe(403);
  await expect(page.getByRole("heading", { name: "Staff only" })).toBeVisible();
  await context.close();
});

test("staff sign in, issue an access link, and the link lets the member set a password", async ({ browser }) => {
  const api = await adminApi();
  const id = await enroll(api, "Linked Member");
  const staff = await staffContext(browser, api);
  // Signed out and in again with the password the staff member set.
  await staff.page.getByRole("button", { name: "Sign out" }).click();
  await staff.page.goto("/admin");
  await signIn(staff.page, staff.email, PASSWORD, "Staff sign in");
  await expect(staff.page).toHaveURL(/\/admin$/);
  await expect(staff.page.getByTestId("signed-in-as")).toHaveText("Sam Staff (staff)");

  const issue = card(staff.page, "Issue an access link");
  await issue.getByLabel("Member id").fill(id);
  await issue.getByRole("button", { name: "Issue link" }).click();
  const link = await issue.getByTestId("secret").inputValue();
  expect(link).toMatch(/^\/claim\/[A-Za-z0-9_-]{43}$/);

  const member = await browser.newContext();
  const page = await member.newPage();
  await claim(page, link, "the member's new password");
  await expect(page).toHaveURL(new RegExp(`/members/${id}$`));
  await expect(page.getByRole("heading", { name: "Linked Member" })).toBeVisible();
  // Used up.
  const again = await page.goto(link);
  expect(again?.status()).toBe(404);
  await expect(page.getByRole("heading", { name: "This link cannot be used" })).toBeVisible();
  await member.close();
  await staff.context.close();
});

test("signing out closes the page's live socket", async ({ browser }) => {
  const context = await browser.newContext();
  const page = await context.newPage();
  const { id } = await join(page, "Signing Out");
  await expect(page.getByTestId("live-indicator")).toHaveText(/^Live$/);
  // Signed out from another tab of the same browser: the server closes the socket (4401), and
  // the page shows what a signed-out visitor sees.
  const other = await context.newPage();
  await other.goto(`/members/${id}`);
  await other.getByRole("button", { name: "Sign out" }).click();
  await expect(other).toHaveURL(/\/$/);
  await expect(page.getByRole("heading", { name: "Sign in to see your membership" })).toBeVisible();
  await context.close();
});

test("without JavaScript: join, redeem, change the profile, and sign out", async ({ browser }) => {
  const context = await browser.newContext({ javaScriptEnabled: false });
  const page = await context.newPage();
  const { id, email } = await join(page, "No Script Joiner");
  await expect(page.getByRole("heading", { name: "No Script Joiner" })).toBeVisible();

  const api = await adminApi();
  await api.post(`/api/members/${id}/points/earn`, { data: { points: 300 } });
  const redeem = card(page, "Redeem a reward");
  await redeem.getByLabel("Points").fill("50");
  await redeem.getByRole("button", { name: "Redeem" }).click();
  // Back on the page, at least as fresh as the redeem.
  await expect(page.getByTestId("points-balance")).toHaveText("250");
  await expect(card(page, "Redeem a reward").getByRole("status")).toContainText("Redeemed 50 points.");
  const tooMuch = card(page, "Redeem a reward");
  await tooMuch.getByLabel("Points").fill("9999");
  await tooMuch.getByRole("button", { name: "Redeem" }).click();
  await expect(card(page, "Redeem a reward").getByRole("alert")).toContainText("not enough points");

  const profile = card(page, "Your profile");
  await profile.getByLabel("Name").fill("Renamed Without Script");
  await profile.getByRole("button", { name: "Save" }).click();
  await expect(page.getByRole("heading", { name: "Renamed Without Script" })).toBeVisible();

  await page.getByRole("button", { name: "Sign out" }).click();
  await expect(page).toHaveURL(/\/$/);
  const response = await page.goto(`/members/${id}`);
  expect(response?.status()).toBe(401);
  // And back in.
  await signIn(page, email, PASSWORD, "Sign in to see your membership");
  await expect(page.getByRole("heading", { name: "Renamed Without Script" })).toBeVisible();
  await context.close();
});

test("without JavaScript: staff sign in, issue an access link, and a wrong password says so", async ({ browser }) => {
  const api = await adminApi();
  const id = await enroll(api, "Offline Linked");
  const staff = await staffContext(browser, api, { javaScriptEnabled: false });
  await staff.page.getByRole("button", { name: "Sign out" }).click();
  await staff.page.goto("/admin");
  await signIn(staff.page, staff.email, "not the password", "Staff sign in");
  await expect(card(staff.page, "Staff sign in").getByRole("alert")).toContainText("the email address or the password is wrong");
  await signIn(staff.page, staff.email, PASSWORD, "Staff sign in");
  await expect(staff.page).toHaveURL(/\/admin/);

  const issue = card(staff.page, "Issue an access link");
  await issue.getByLabel("Member id").fill(id);
  await issue.getByRole("button", { name: "Issue link" }).click();
  const link = await card(staff.page, "Issue an access link").getByTestId("secret").inputValue();
  // Shown once: a reload shows no link.
  await staff.page.reload();
  await expect(card(staff.page, "Issue an access link").getByTestId("secret")).toHaveCount(0);

  const member = await browser.newContext({ javaScriptEnabled: false });
  const page = await member.newPage();
  await claim(page, link, "offline member password");
  await expect(page).toHaveURL(new RegExp(`/members/${id}`));
  await expect(page.getByRole("heading", { name: "Offline Linked" })).toBeVisible();
  await member.close();
  await staff.context.close();
});

test("without JavaScript a member sees only their own page and cannot open the staff console either", async ({ browser }) => {
  const api = await adminApi();
  const other = await enroll(api, "Someone Else Offline");
  const context = await browser.newContext({ javaScriptEnabled: false });
  const page = await context.newPage();
  await join(page, "Curious Offline");
  const otherPage = await page.goto(`/members/${other}`);
  expect(otherPage?.status()).toBe(404);
  await expect(page.getByRole("heading", { name: "Member not found" })).toBeVisible();
  const response = await page.goto("/admin");
  expect(response?.status()).toBe(403);
  await expect(page.getByRole("heading", { name: "Staff only" })).toBeVisible();
  await context.close();
});
